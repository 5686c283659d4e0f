"""Sources, preprocessing ops and pipelines, including every kind of bad input."""

import inspect
import io
import os
import re

import numpy as np
import pytest
from helpers import load_preset
from PIL import Image

from configs import flextok
from vitok import config as config_lib
from vitok.data import ops, pipeline, sources

RNG = np.random.default_rng(0)


def write_image(path, array, fmt=None, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    img.save(path, format=fmt)


def photo(h=40, w=48, c=3):
    return RNG.integers(0, 256, size=(h, w, c), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            write_image(str(tmp_path / cls / f"{i}.png"), photo())
    write_image(str(tmp_path / "dog" / "x.webp"), photo(), fmt="WEBP")
    write_image(str(tmp_path / "cat" / "y.jpg"), photo(), fmt="JPEG")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


# --- sources ---------------------------------------------------------------------------------------


def test_folder_source_labels_from_subfolders(folder):
    src = sources.FolderSource(path=str(folder))
    assert src.classes == ["cat", "dog"]
    assert len(src) == 7  # notes.txt ignored; png, jpg and webp found
    labels = {os.path.basename(src[i]["path"]): int(src[i]["label"]) for i in range(len(src))}
    assert labels["y.jpg"] == 0 and labels["x.webp"] == 1


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*contains no images"):
        sources.FolderSource(path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="missing"):
        sources.FolderSource(path=str(tmp_path / "missing"))


def test_mnist5k_splits_are_disjoint_and_balanced():
    train, test = sources.Mnist5kSource(split="train"), sources.Mnist5kSource(split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert not set(train.indices) & set(test.indices)
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (28, 28, 1)
    # Real digits: ink on a dark background, around a quarter of the pixels lit.
    lit = (train.images > 128).mean()
    assert 0.05 < lit < 0.35


def test_photo_crops_never_share_a_source_photo():
    for train_split in ("train", "train_extended"):
        assert not set(sources.PHOTO_SPLITS[train_split]) & set(sources.PHOTO_SPLITS["test"])
    extended = sources.PhotoCropsSource(split="train_extended", num_examples=11)
    plain = sources.PhotoCropsSource(split="train", num_examples=8)
    # The extended split is the eight plus three: the same crops of the shared photos.
    for i in range(8):
        np.testing.assert_array_equal(extended[i]["image"], plain[i]["image"])
    assert extended[10]["path"].startswith("grace_hopper.jpg")
    src = sources.PhotoCropsSource(split="test", crop_size=32, num_examples=10)
    a, b = src[3], src[3]
    np.testing.assert_array_equal(a["image"], b["image"])  # deterministic by index
    assert a["image"].shape == (32, 32, 3) and a["image"].std() > 5  # a real, textured crop
    assert src[0]["path"].startswith("chelsea.png")


def test_photo_crops_take_a_chosen_photo_list_and_name_a_missing_photo():
    src = sources.PhotoCropsSource(split="train", crop_size=16, photos="rocket.jpg, coffee.png")
    assert [src[i]["path"].split("#")[0] for i in range(4)] == ["rocket.jpg", "coffee.png"] * 2
    with pytest.raises(ValueError, match="no photo.*nope.png"):
        sources.PhotoCropsSource(split="train", photos="rocket.jpg,nope.png")


def test_photo_crops_read_the_photos_other_wheels_ship():
    import matplotlib
    import sklearn

    expected = {
        "china.jpg": os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images"),
        "grace_hopper.jpg": os.path.join(
            os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data"
        ),
    }
    for name, folder in expected.items():
        assert os.path.samefile(str(sources.photo_path(name)), os.path.join(folder, name))
    src = sources.PhotoCropsSource(split="train", crop_size=32, photos=",".join(expected))
    crops = [src[i] for i in range(2)]
    assert [c["path"].split("#")[0] for c in crops] == list(expected)
    for crop in crops:
        assert crop["image"].shape == (32, 32, 3) and crop["image"].std() > 5  # textured


# --- decoding and bad input --------------------------------------------------------------------------


def encode(array, fmt="PNG", mode=None):
    buf = io.BytesIO()
    (Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)).save(buf, format=fmt)
    return buf.getvalue()


def decode(data, channels=3, path="f.png"):
    return ops.parse(f"decode(channels={channels})")({"image": data, "path": path}, RNG)["image"]


def test_decode_grayscale_to_rgb_and_back():
    gray = photo(c=1)[..., 0]
    rgb = decode(encode(gray))
    assert rgb.shape == (40, 48, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)
    np.testing.assert_array_equal(decode(encode(gray), channels=1)[..., 0], gray)


def test_decode_rgba_composites_over_white():
    rgba = photo(c=4)
    rgba[..., 3] = 0
    rgba[0, 0, 3] = 255
    out = decode(encode(rgba))
    assert (out[1:, :] == 255).all()
    np.testing.assert_array_equal(out[0, 0], rgba[0, 0, :3])
    half = rgba.copy()
    half[..., 3] = 128
    expected = np.round(half[..., :3] * (128 / 255) + 255 * (1 - 128 / 255))
    np.testing.assert_allclose(decode(encode(half)), expected, atol=1)


def test_decode_16_bit_scales_to_8_bit():
    deep = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 34).astype(np.uint16)
    out = decode(encode(deep), channels=1)[..., 0]
    np.testing.assert_allclose(out, np.round(deep / 257.0), atol=1)


@pytest.mark.parametrize(
    "data, message",
    [
        (encode(photo())[:200], "truncated or corrupt"),
        (b"\x89PNG garbage" * 10, "not a readable image"),
        (b"", "empty"),
    ],
    ids=["truncated", "corrupt", "empty"],
)
def test_bad_files_raise_naming_the_file(data, message):
    with pytest.raises(ops.BadImageError, match=f"bad/file.png.*{message}"):
        decode(data, path="bad/file.png")


def test_too_small_image_is_an_error_unless_resized():
    small = {"image": photo(10, 12), "path": "tiny.png"}
    with pytest.raises(ops.BadImageError, match="tiny.png.*10x12.*smaller than the crop 28x28"):
        ops.parse("random_crop(28)")(small, RNG)
    out = ops.parse("resize(28)|central_crop(28)")(small, RNG)
    assert out["image"].shape == (28, 28, 3)


def test_ops_reference_values():
    image = photo(8, 10)
    ex = {"image": image}
    np.testing.assert_array_equal(
        ops.parse("central_crop((4, 6))")(ex, RNG)["image"], image[2:6, 2:8]
    )
    np.testing.assert_array_equal(ops.parse("flip_lr(1.0)")(ex, RNG)["image"], image[:, ::-1])
    vr = ops.parse("value_range(-1, 1)")(ex, RNG)["image"]
    np.testing.assert_allclose(vr, image / 127.5 - 1, atol=1e-6)
    assert ops.parse("resize(4)")(ex, RNG)["image"].shape == (4, 5, 3)
    crop = ops.parse("random_crop(3)")(ex, np.random.default_rng(1))["image"]
    windows = [image[i : i + 3, j : j + 3] for i in range(6) for j in range(8)]
    assert any(np.array_equal(crop, w) for w in windows)


@pytest.mark.parametrize("pp", ["nope", "resize(", "resize(size=x)", "resize(1, 2, 3)"])
def test_bad_pp_strings_name_the_op(pp):
    with pytest.raises(ValueError, match="op"):
        ops.parse(pp)


# --- pipelines -----------------------------------------------------------------------------------------

PP = "decode(channels=1)|value_range(0, 1)"


def test_pipeline_is_deterministic_and_checkpointable():
    config = {"source": "mnist5k", "pp": "decode(channels=1)|random_crop(20)|value_range(0, 1)"}
    a = iter(pipeline.train_dataset(config, global_batch_size=8, seed=3))
    b = iter(pipeline.train_dataset(config, global_batch_size=8, seed=3))
    c = iter(pipeline.train_dataset(config, global_batch_size=8, seed=4))
    first = [next(a) for _ in range(3)]
    for x in first:
        np.testing.assert_array_equal(x["image"], next(b)["image"])
    assert not np.array_equal(first[0]["image"], next(c)["image"])
    state = a.get_state()
    expected = next(a)
    d = iter(pipeline.train_dataset(config, global_batch_size=8, seed=3))
    d.set_state(state)
    np.testing.assert_array_equal(next(d)["image"], expected["image"])


def test_process_slices_reassemble_the_global_batch():
    config = {"source": "mnist5k", "pp": "decode(channels=1)|flip_lr|value_range(0, 1)"}
    whole = iter(pipeline.train_dataset(config, global_batch_size=12, seed=0))
    parts = [
        iter(
            pipeline.train_dataset(
                config, global_batch_size=12, seed=0, process_index=p, process_count=3
            )
        )
        for p in range(3)
    ]
    for _ in range(4):
        batch = next(whole)
        local = [next(p) for p in parts]
        assert local[0]["image"].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([x["image"] for x in local]), batch["image"])
        np.testing.assert_array_equal(np.concatenate([x["label"] for x in local]), batch["label"])


def test_repeated_augmentation_repeats_each_example_on_different_devices():
    """r = 3 copies of B / r examples per batch, copy c of example u at c * B / r + u; the
    examples follow the unrepeated pipeline's shuffled order; each copy is cropped differently;
    and the processes' slices still reassemble the global batch."""
    plain = {"source": "mnist5k", "pp": "decode(channels=1)"}
    crops = {"source": "mnist5k", "pp": "decode(channels=1)|random_crop(20)"}
    reference = iter(pipeline.train_dataset(plain, global_batch_size=4, seed=5))
    repeated = iter(
        pipeline.train_dataset(plain | {"repeated_augmentation": 3}, global_batch_size=12, seed=5)
    )
    augmented = iter(
        pipeline.train_dataset(crops | {"repeated_augmentation": 3}, global_batch_size=12, seed=5)
    )
    parts = [
        iter(
            pipeline.train_dataset(
                crops | {"repeated_augmentation": 3},
                global_batch_size=12,
                seed=5,
                process_index=p,
                process_count=3,
            )
        )
        for p in range(3)
    ]
    for _ in range(3):
        unique, batch, crop = next(reference), next(repeated), next(augmented)
        for c in range(3):
            np.testing.assert_array_equal(batch["image"][4 * c : 4 * c + 4], unique["image"])
            np.testing.assert_array_equal(crop["label"][4 * c : 4 * c + 4], unique["label"])
        copies = crop["image"].reshape(3, 4, -1)
        assert all(not np.array_equal(copies[0, u], copies[1, u]) for u in range(4))
        local = np.concatenate([next(p)["image"] for p in parts])
        np.testing.assert_array_equal(local, crop["image"])
    with pytest.raises(ValueError, match="repeated_augmentation=13 must be in"):
        pipeline.train_dataset(plain | {"repeated_augmentation": 13}, global_batch_size=12, seed=0)


@pytest.mark.slow
def test_worker_processes_make_the_same_batches_and_resume_exactly():
    config = {"source": "mnist5k", "pp": "decode(channels=1)|random_crop(20)"}
    threads = iter(pipeline.train_dataset(config, global_batch_size=8, seed=1))
    workers = iter(
        pipeline.train_dataset(config | {"worker_processes": 2}, global_batch_size=8, seed=1)
    )
    for _ in range(3):
        np.testing.assert_array_equal(next(workers)["image"], next(threads)["image"])
    state = workers.get_state()
    expected = next(threads)["image"]
    resumed = iter(
        pipeline.train_dataset(config | {"worker_processes": 2}, global_batch_size=8, seed=1)
    )
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], expected)


def test_epoch_covers_every_training_example_once():
    config = {"source": "mnist5k", "pp": "decode(channels=1)"}
    it = iter(pipeline.train_dataset(config, global_batch_size=100, seed=0))
    seen = np.concatenate([next(it)["image"].reshape(100, -1) for _ in range(40)])
    src = sources.Mnist5kSource(split="train")
    as_rows = {row.tobytes() for row in src.images.reshape(len(src), -1)}
    assert {row.tobytes() for row in seen} == as_rows


def test_bad_files_fail_or_are_skipped_and_counted(folder):
    (folder / "dog" / "broken.png").write_bytes(encode(photo())[:100])
    config = {"source": "folder", "path": str(folder), "pp": "decode|resize(32)|central_crop(32)"}
    with pytest.raises(ops.BadImageError, match="broken.png"):
        list(pipeline.eval_batches(config, global_batch_size=4))
    counter = pipeline.SkipCounter()
    batches = list(
        pipeline.eval_batches(config | {"skip_bad": True}, global_batch_size=4, counter=counter)
    )
    assert counter.count == 1
    assert sum(b["mask"].sum() for b in batches) == 7
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)


def test_eval_batches_pad_and_split_over_processes():
    config = {"source": "mnist5k", "split": "test", "pp": PP}
    whole = list(pipeline.eval_batches(config, global_batch_size=64, max_examples=150))
    assert sum(b["mask"].sum() for b in whole) == 150
    per_process = [
        list(
            pipeline.eval_batches(
                config, global_batch_size=64, max_examples=150, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1])
    labels = np.concatenate([b["label"][b["mask"] > 0] for part in per_process for b in part])
    np.testing.assert_array_equal(
        np.sort(labels), np.sort(np.concatenate([b["label"][b["mask"] > 0] for b in whole]))
    )


def test_unknown_data_source_names_the_known_ones():
    """A typo in data.source used to end in an AttributeError about ``__path__``."""
    with pytest.raises(ValueError, match=r"unknown data source 'mnist5kk'; known: .*'mnist5k'"):
        sources.build_source({"source": "mnist5kk"}, "train")


def test_random_hue_keeps_luma_and_a_full_turn_is_the_identity():
    from vitok.data.ops import _RGB_TO_YIQ, hue_rotation_matrix

    np.testing.assert_allclose(hue_rotation_matrix(360.0), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(hue_rotation_matrix(0.0), np.eye(3), atol=1e-9)
    rgb = np.random.default_rng(0).uniform(60, 200, size=(50, 3))
    rotated = rgb @ hue_rotation_matrix(90.0).T
    np.testing.assert_allclose(rotated @ _RGB_TO_YIQ[0], rgb @ _RGB_TO_YIQ[0], atol=1e-6)
    # Pure red turned by 120 degrees lands near green-ish hues (its red share falls).
    red = np.array([200.0, 60.0, 60.0])
    assert (red @ hue_rotation_matrix(120.0).T)[0] < 120
    fn = ops.parse("random_hue(45)")
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = fn({"image": image}, np.random.default_rng(2))["image"]
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)


def test_a_key_that_no_part_of_the_pipeline_reads_is_an_error_naming_it():
    config = flextok.get_config("tiny")
    with config.unlocked():
        config.data.crop_sise = 16
    with pytest.raises(config_lib.ConfigError, match=r"config.data.crop_sise is not a key of"):
        config_lib.validate(config)
    config = flextok.get_config("tiny")
    with config.unlocked():
        config.evals.recon.data.photo = "astronaut"
    with pytest.raises(config_lib.ConfigError, match=r"config.evals.recon.data.photo is not"):
        config_lib.validate(config)
    # Defaults live in one place: the source's constructor (the pipeline's in PIPELINE_KEYS).
    assert (
        sources.source_keys("photo_crops")["min_scale"]
        == inspect.signature(sources.PhotoCropsSource).parameters["min_scale"].default
    )
    with pytest.raises(ValueError, match="config.data.path is required for data source 'folder'"):
        sources.build_source({"source": "folder", "path": ""}, "train")


@pytest.mark.parametrize(
    "preset, section, key, message",
    [
        ("flextok.py:tiny", "", "log_evry", "unknown config key 'config.log_evry'"),
        ("flextok.py:tiny", "flextok", "cfg_dropot", "unknown config key 'config.flextok.cfg_dropot'"),
        ("flextok.py:tiny", "evals.recon", "stepz", "unknown config key 'config.evals.recon.stepz'"),
        ("flextok.py:tiny", "optim", "weight_decy", "unknown config key 'config.optim.weight_decy'"),
        ("flextok.py:tiny", "optim", "momentum", "'config.optim.momentum'; config.optim takes"),
        ("flextok.py:tiny", "init_from", "skp", "unknown config key 'config.init_from.skp'"),
        ("vit.py:tiny", "evals.test", "patch_sise", "'config.evals.test.patch_sise'"),
        ("vit.py:tiny_seg", "", "label_smoothing", "unknown config key 'config.label_smoothing'"),
        ("karl.py:tiny", "karl", "budget", "unknown config key 'config.karl.budget'"),
    ],
)  # fmt: skip
def test_a_key_that_no_component_reads_is_an_error_naming_it(preset, section, key, message):
    """Task, evaluator, optimizer and top-level keys are checked like data keys (momentum is
    an SGD key, label_smoothing a classification key: neither is read where they are put)."""
    from vitok.train import run_options

    config = load_preset(preset)
    run_options(config)  # the preset itself is clean
    with config.unlocked():
        parent = config
        for name in filter(None, section.split(".")):
            parent = parent[name]
        parent[key] = 0.1
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        run_options(config)


def test_a_components_defaults_live_in_its_declared_keys():
    from vitok.evaluators.reconstruction import ReconstructionEvaluator
    from vitok.optim import OPTIMIZER_KEYS, optim_options
    from vitok.tasks.flextok import FlexTokTask
    from vitok.train import RUN_KEYS, run_options

    config = flextok.get_config("tiny")
    with config.unlocked():
        del config.flextok, config.log_every, config.optim.b1
    assert run_options(config)["log_every"] == RUN_KEYS["log_every"] == 50
    task = FlexTokTask(config)  # no section: every default
    assert task.loss_space == FlexTokTask.CONFIG_KEYS["flextok"]["loss_space"] == "velocity"
    assert optim_options(config.optim)["b1"] == OPTIMIZER_KEYS["adamw"]["b1"] == 0.9
    assert ReconstructionEvaluator.OPTIONS["baseline_examples"] == 8192
    with pytest.raises(ValueError, match=r"config.optim.name must be one of \['adamw', 'sgd'\]"):
        optim_options({"name": "adam", "lr": 1.0})


def test_any_preset_switches_its_data_source_from_the_command_line(folder):
    base = ["--config=configs/flextok.py:tiny", "--workdir=/tmp/unused"]
    args = config_lib.parse_command_line(
        [*base, "--config.data.source=folder", f"--config.data.path={folder}"]
    )
    data = args.config.data
    assert data.source == "folder" and data.path == str(folder)
    assert data.pp == flextok.get_config("tiny").data.pp  # the preset's pipeline keys stay
    assert "crop_size" not in data  # photo_crops' keys go
    batch = next(iter(pipeline.train_dataset(data, global_batch_size=2, seed=0)))
    assert batch["image"].shape == (2, 40, 48, 3) and batch["label"].shape == (2,)
    # The new source's keys are checked like any other.
    with pytest.raises(SystemExit, match="unknown config key 'config.data.crop_size'"):
        config_lib.parse_command_line(
            [*base, "--config.data.source=folder", "--config.data.crop_size=8"]
        )
    with pytest.raises(SystemExit, match="unknown data source 'mnist5kk'; known"):
        config_lib.parse_command_line([*base, "--config.data.source=mnist5kk"])
    # tfds too (an eval section here): its keys appear with their defaults.
    args = config_lib.parse_command_line(
        [*base, "--config.evals.recon.data.source=tfds", "--config.evals.recon.data.name=x"]
    )
    recon = args.config.evals.recon.data
    assert (recon.name, recon.image_key, recon.split) == ("x", "image", "test")


def test_one_registry_mechanism_rejects_duplicates_and_names_the_known():
    from vitok.data import ops
    from vitok.nn import attention
    from vitok.registry import EVALUATORS, MODELS, TASKS

    for registry, existing in [
        (MODELS, "vit"), (TASKS, "flextok"), (EVALUATORS, "reconstruction"),
        (sources.SOURCES, "folder"), (ops.OPS, "flip_lr"), (attention.BACKENDS, "chunked"),
    ]:  # fmt: skip
        registry.lookup(existing)
        with pytest.raises(ValueError, match="registered twice"):
            registry.register(existing)(lambda: None)
        with pytest.raises(
            ValueError, match=rf"unknown {registry.kind} 'nope'; known: .*{existing}"
        ):
            registry.lookup("nope")
    assert {"ar", "fsq_ae", "fsq_vit", "nar", "vae"} <= set(MODELS.names())
