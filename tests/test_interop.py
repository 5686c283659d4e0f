"""Released checkpoints converted into vitok runs, against the reference implementations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.official_layouts import (
    FLEXIVIT_TINY,
    diffusers_vae_state_dict,
    fid_images,
    flexivit_arrays,
    flexivit_images,
    gpt_state_dict,
    inception_state_dict,
    llamagen_vq_state_dict,
    vq_images,
    write_safetensors,
    write_torch_file,
)
from vitok import runs
from vitok.evaluators.fid import FeatureStats, fid_from_stats
from vitok.evaluators.inception import InceptionFID, params_from_state_dict
from vitok.interop import ConversionError, llamagen, llamagen_gpt
from vitok.interop.torch_files import read_state_dict
from vitok.tools import convert

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _convert_flexivit(tmp_path, arrays, name="run"):
    checkpoint = str(tmp_path / f"{name}.npz")
    np.savez(checkpoint, **arrays)
    workdir = str(tmp_path / name)
    convert.main([
        "--from=flexivit", f"--checkpoint={checkpoint}", f"--workdir={workdir}",
        "--config.model.image_size=(24, 24)", "--config.model.patch_size=8",
        "--config.model.dtype=float32",
    ])  # fmt: skip
    return workdir


def test_converted_flexivit_matches_big_vision_at_every_patch_size(tmp_path):
    """golden/flexivit_tiny.npz holds big_vision's own FlexiViT logits on these weights and
    images (golden/make_flexivit.py says how): the converted run reproduces them at patch
    sizes 12, 8 (native), 6, 4 and 3, the shrinking ones needing big_vision's PI-resize."""
    workdir = _convert_flexivit(tmp_path, flexivit_arrays(0))
    run = runs.load_run(workdir)
    assert run.step == 0 and run.weights == "params"
    model = run.module()
    images = flexivit_images(1)
    golden = np.load(os.path.join(GOLDEN, "flexivit_tiny.npz"))
    for seqhw in (2, 3, 4, 6, 8):
        want = golden[f"logits_seqhw{seqhw}"]
        got = np.asarray(model(images, patch_size=24 // seqhw))
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale, (seqhw, got, want)
    # vitok's own (antialiased) PI-resize gives other logits when the kernel shrinks: the
    # converted config must have selected big_vision's.
    assert run.config.model.kernel_resize == "bilinear"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a.pop("Transformer/encoderblock_1/LayerNorm_1/bias"), "missing Transformer/encoderblock_1/LayerNorm_1/bias [32]"),
        (lambda a: a.update({"head/bias": np.zeros(7, np.float32)}), "head/bias is [7], expected [5]"),
        (lambda a: a.update({"extra/thing": np.zeros(3, np.float32)}), "unexpected extra/thing [3]"),
        (lambda a: a.pop("embedding/kernel"), "has no 'embedding/kernel'"),
    ],
)  # fmt: skip
def test_a_checkpoint_off_the_layout_is_refused_and_nothing_written(
    tmp_path, capsys, damage, message
):
    arrays = flexivit_arrays(0)
    damage(arrays)
    with pytest.raises(SystemExit) as exit:
        _convert_flexivit(tmp_path, arrays)
    assert message in str(exit.value)
    assert str(exit.value).startswith("vitok.tools.convert: ") and "\n" not in str(exit.value)
    assert not os.path.exists(tmp_path / "run")


def test_unreadable_checkpoint_and_existing_run_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(SystemExit, match="is not a readable .npz file"):
        convert.main(["--from=flexivit", f"--checkpoint={bad}", f"--workdir={tmp_path / 'w'}"])
    with pytest.raises(SystemExit, match="not found"):
        convert.main(["--from=flexivit", f"--checkpoint={tmp_path / 'x.npz'}", "--workdir=w"])
    with pytest.raises(SystemExit, match="unknown converter 'flexivt'"):
        convert.main(["--from=flexivt", f"--checkpoint={bad}", "--workdir=w"])
    workdir = _convert_flexivit(tmp_path, flexivit_arrays(0))
    with pytest.raises(SystemExit, match="already holds a run"):
        _convert_flexivit(tmp_path, flexivit_arrays(0))
    assert os.path.exists(os.path.join(workdir, "config.json"))


def test_old_big_vision_layouts_are_read_as_the_current_one(tmp_path):
    """Pre-2022 big_vision ViTs stored the class token's position embedding as row 0 of one
    g*g + 1 table inside Transformer/; big_vision's loader folds it into cls. Converting that
    layout gives the same model as the current layout with cls + row 0."""
    arrays = flexivit_arrays(0)
    row0 = (
        np.random.default_rng(5).standard_normal((1, 1, FLEXIVIT_TINY["width"])).astype(np.float32)
    )
    old = dict(arrays)
    old["Transformer/pos_embedding"] = np.concatenate([row0, old.pop("pos_embedding")], axis=1)
    new = dict(arrays, cls=arrays["cls"] + row0)
    images = flexivit_images(1)
    a = runs.load_run(_convert_flexivit(tmp_path, old, "old")).module()(images)
    b = runs.load_run(_convert_flexivit(tmp_path, new, "new")).module()(images)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_torch_state_dicts_read_without_torch_in_both_formats(tmp_path):
    """golden/make_torch_files.py wrote one state dict with torch.save as a zip archive and
    in the legacy stream format; both read back equal to the tensors' numpy values (dtype,
    shape, strided views)."""
    want = np.load(os.path.join(GOLDEN, "torch_state.npz"))
    for fmt in ("zip", "legacy"):
        got = read_state_dict(os.path.join(GOLDEN, f"torch_state_{fmt}.pth"))
        assert sorted(got) == sorted(want.files)
        for name in want.files:
            assert got[name].dtype == want[name].dtype, (fmt, name)
            np.testing.assert_array_equal(got[name], want[name])
    legacy = open(os.path.join(GOLDEN, "torch_state_legacy.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(legacy[:-40])
    with pytest.raises(ConversionError, match="truncated|not a readable"):
        read_state_dict(str(tmp_path / "cut.pth"))
    (tmp_path / "junk.pth").write_bytes(b"\x80\x04junk")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint|not a PyTorch"):
        read_state_dict(str(tmp_path / "junk.pth"))


@pytest.fixture(scope="module")
def inception_golden():
    golden = np.load(os.path.join(GOLDEN, "inception_fid.npz"))
    shapes = json.loads(str(golden["shapes"]))
    state = inception_state_dict(shapes, 0)
    return golden, params_from_state_dict(state, "the random weights")


def test_inception_matches_pytorch_fid_pool_features_and_logits(inception_golden):
    """golden/make_inception.py ran pytorch-fid's own InceptionV3 on these random weights."""
    golden, params = inception_golden
    net = InceptionFID(params)
    images = 2 * fid_images(1, 3, 64) - 1  # vitok's [-1, 1]
    pool = np.asarray(net.features(images))
    want = golden["pool3"]
    assert pool.shape == (3, 2048)
    assert np.abs(pool - want).max() <= 1e-4 * np.abs(want).max()
    logits = np.asarray(net.logits(images))
    assert np.abs(logits - golden["logits"]).max() <= 1e-4 * np.abs(golden["logits"]).max()
    grey = images[..., :1]  # grey images are the same images in RGB
    np.testing.assert_array_equal(net.features(grey), net.features(grey.repeat(3, -1)))


def test_inception_fid_matches_pytorch_fid(inception_golden):
    """The 64-d block-0 features of two sets of 80 images, and FID from them, as pytorch-fid
    computed (at 64 dims 80 samples give full-rank covariances, so the Fréchet distance is
    well-conditioned)."""
    golden, params = inception_golden
    net = InceptionFID(params, block=0)
    feats = [np.asarray(net.features(2 * fid_images(seed, 80, 32) - 1)) for seed in (2, 3)]
    for got, want in zip(feats, (golden["block0_a"], golden["block0_b"]), strict=True):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    stats = []
    for f in feats:
        s = FeatureStats()
        s.add(f[:50])
        s.add(f[50:])
        stats.append(s)
    fid = fid_from_stats(*stats)
    assert abs(fid - float(golden["fid_block0"])) <= 1e-3 * float(golden["fid_block0"])


def test_inception_refuses_other_weights():
    with pytest.raises(ConversionError, match="missing Conv2d_1a_3x3.conv.weight"):
        params_from_state_dict({"fc.weight": np.zeros((2, 2))}, "x.pth")


def test_a_converted_release_evaluates_without_training(tmp_path, capsys):
    """vitok.tools.evaluate runs the converted run's classification evaluator (here on 64
    embedded digits in RGB at 24 px, labels 0-9 against the 5 random classes) at the native
    patch size and at 4; its accuracy equals the argmax of the loaded model's own logits on
    the same images, computed here."""
    from vitok.data import ops
    from vitok.data.sources import build_source
    from vitok.tools import evaluate

    workdir = _convert_flexivit(tmp_path, flexivit_arrays(0))
    pp = "decode(channels=3)|resize(24)|value_range(-1, 1)"
    data = [
        "--config.evals.test.data.source=mnist5k", "--config.evals.test.data.split=test",
        f"--config.evals.test.data.pp={pp}", "--config.evals.test.max_examples=64",
        "--config.evals.test.batch_size=32", "--config.evals.test_p8.patch_size=4",
    ]  # fmt: skip
    for name in ("test_p8",):
        data += [
            f"--config.evals.{name}.data.source=mnist5k", f"--config.evals.{name}.data.split=test",
            f"--config.evals.{name}.data.pp={pp}", f"--config.evals.{name}.max_examples=64",
            f"--config.evals.{name}.batch_size=32",
        ]  # fmt: skip
    evaluate.main([f"--workdir={workdir}", "--only=test,test_p8", *data])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = runs.load_run(workdir).module()
    source = build_source({"source": "mnist5k"}, "test")
    transform = ops.parse(pp)
    examples = [transform(source[i], np.random.default_rng(0)) for i in range(64)]
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    for key, patch in (("eval/accuracy", 8), ("eval_p8/accuracy", 4)):
        want = float((np.asarray(model(images, patch_size=patch)).argmax(-1) == labels).mean())
        assert metrics[key] == pytest.approx(want), (key, metrics)


@pytest.fixture(scope="module")
def llamagen_golden():
    golden = np.load(os.path.join(GOLDEN, "llamagen_vq_tiny.npz"))
    return golden, json.loads(str(golden["shapes"]))


def _convert_llamagen_vq(tmp_path, state, name="vq", *overrides):
    checkpoint = str(tmp_path / f"{name}.pt")
    write_torch_file(checkpoint, {"model": state, "steps": 1000})  # a training checkpoint
    workdir = str(tmp_path / name)
    convert.main([
        "--from=llamagen_vq", f"--checkpoint={checkpoint}", f"--workdir={workdir}",
        "--config.model.image_size=(32, 32)", "--config.model.dtype=float32", *overrides,
    ])  # fmt: skip
    return workdir


def test_converted_llamagen_vq_matches_llamagen(tmp_path, llamagen_golden):
    """golden/llamagen_vq_tiny.npz holds LlamaGen's own VQModel outputs on these weights and
    images (golden/make_llamagen_vq.py says how): the converted run gives the same code ids,
    and its encoder and decoders agree within 1e-4 relative."""
    golden, shapes = llamagen_golden
    run = runs.load_run(_convert_llamagen_vq(tmp_path, llamagen_vq_state_dict(shapes, 0)))
    model = run.module()
    assert (model.grid, model.codebook_size, tuple(run.config.model.mults)) == (
        (16, 16),
        256,
        (1, 2),
    )
    images = vq_images(1, 2, 32)
    z = np.asarray(model.quant_conv(model.encoder(images))).transpose(0, 3, 1, 2)
    ids = np.asarray(model.tokenize(images))
    recon = np.asarray(model(images)[0]).transpose(0, 3, 1, 2)
    decoded = np.asarray(model.detokenize(golden["ids"])).transpose(0, 3, 1, 2)
    for got, want in ((z, golden["z"]), (recon, golden["recon"]), (decoded, golden["decoded"])):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_array_equal(ids, golden["ids"])


def test_llamagen_vq_layout_is_the_releases(llamagen_golden):
    """The layout the converter expects is the reference model's state_dict (stored in the
    golden), and at VQ-16's sizes it has LlamaGen's 72M parameters, as vitok's preset."""
    _, shapes = llamagen_golden
    shapes.pop("quantize.codebook_used")
    dims = llamagen.read_dims({k: np.zeros(v) for k, v in shapes.items()}, "the golden")
    assert llamagen.expected_layout(dims) == {k: tuple(v) for k, v in shapes.items()}
    vq16 = dict(dims, width=128, mults=(1, 1, 2, 2, 4), z_channels=256, codebook_size=16384)
    total = sum(np.prod(s) for s in llamagen.expected_layout(vq16).values())
    assert 71.5e6 < total < 72.5e6


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("decoder.conv_blocks.0.attn.2.proj_out.bias"), "missing decoder.conv_blocks.0.attn.2.proj_out.bias [64]"),
        (lambda s: s.update({"quant_conv.weight": np.zeros((8, 16, 1, 1), np.float32)}), "quant_conv.weight is [8, 16, 1, 1], expected [8, 32, 1, 1]"),
        (lambda s: s.pop("quantize.embedding.weight"), "has no 'quantize.embedding.weight'"),
    ],
)  # fmt: skip
def test_a_vq_checkpoint_off_the_layout_is_refused(tmp_path, llamagen_golden, damage, message):
    state = llamagen_vq_state_dict(llamagen_golden[1], 0)
    damage(state)
    with pytest.raises(SystemExit) as exit:
        _convert_llamagen_vq(tmp_path, state)
    assert message in str(exit.value) and "\n" not in str(exit.value)
    assert not os.path.exists(tmp_path / "vq")


def test_inception_score_has_its_known_values_and_reference_files_are_checked(tmp_path):
    """IS is exp(E KL(p(y|x) || p(y))): 1 when every image gets the same class distribution;
    n when n images are each certain of a different class; per split, then averaged."""
    from vitok.evaluators.inception import inception_score, reference_statistics

    same = np.tile(np.random.default_rng(0).standard_normal(1008), (6, 1))
    assert inception_score(same, splits=1) == pytest.approx(1.0)
    certain = np.full((8, 1008), -1e4)
    certain[np.arange(8), np.arange(8)] = 0.0
    assert inception_score(certain, splits=1) == pytest.approx(8.0)
    assert inception_score(certain, splits=2) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score(certain, splits=10)

    good = tmp_path / "ref.npz"
    np.savez(good, mu=np.zeros(2048), sigma=np.eye(2048))
    mu, sigma = reference_statistics(str(good))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "other.npz", arr_0=np.zeros(3))
    for name, message in [
        ("none.npz", "not found"),
        ("other.npz", "holds no 'mu' and 'sigma'"),
        ("small.npz", r"got \[64\], \[64, 64\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            reference_statistics(str(tmp_path / name))


def _tokenize_labelled_photos(workdir, model, photos, out, count: int, train: int):
    """Writes ``count`` 32x32 PNGs as photos/{train,test}/class{0,1}/ (the first ``train`` in
    train) and runs vitok.tools.tokenize on the folder: its ids must be the model's.
    Returns (the tokens file, the model's ids in the file's order)."""
    from PIL import Image

    from vitok.tools import tokenize

    pixels = np.round((vq_images(7, count, 32) + 1) * 127.5).astype(np.uint8)
    for i, image in enumerate(pixels):
        split, label = ("train", "test")[i // train], f"class{i % 2}"
        os.makedirs(photos / split / label, exist_ok=True)
        Image.fromarray(image).save(photos / split / label / f"{i}.png")
    tokenize.main([f"--workdir={workdir}", f"--images={photos}", f"--out={out}"])
    tokens = np.load(out)
    order = [int(os.path.basename(str(n))[:-4]) for n in tokens["names"]]
    want = np.asarray(model.tokenize(pixels[order].astype(np.float32) / 127.5 - 1))
    np.testing.assert_array_equal(tokens["tokens"], want)
    return tokens, want


@pytest.mark.slow
def test_a_converted_vq_tokenizes_a_folder_and_a_nar_trains_and_samples_over_its_codes(tmp_path):
    """The official-weights workflow end to end on a random-weight VQ in LlamaGen's layout:
    convert, tokenize a folder, detokenize, extract codes of a labelled folder for NAR, train
    NAR a few steps over them and sample with the converted tokenizer decoding."""
    import jax
    from helpers import short_run
    from PIL import Image

    from configs import nar
    from vitok import train
    from vitok.tools import detokenize, extract_codes

    # Three levels (f = 4, 8x8 codes at 32 px) keep NAR small; the layout is the one
    # test_llamagen_vq_layout_is_the_releases checks against LlamaGen's own state_dict.
    dims = dict(channels=3, width=32, mults=(1, 2, 2), blocks=2, z_channels=32, codebook_size=256, codebook_dim=8)  # fmt: skip
    shapes = dict(llamagen.expected_layout(dims), **{"quantize.codebook_used": (65536,)})
    pp = "--config.evals.recon.data.pp=decode(channels=3)|value_range(-1, 1)"  # 32 px as stored
    vq = _convert_llamagen_vq(tmp_path, llamagen_vq_state_dict(shapes, 0), "vq", pp)
    model = runs.load_run(vq).module()
    photos = tmp_path / "photos"
    tokens, want = _tokenize_labelled_photos(vq, model, photos, tmp_path / "tokens.npz", 8, 6)
    detokenize.main([f"--workdir={vq}", f"--tokens={tmp_path / 'tokens.npz'}", f"--out={tmp_path / 'recon'}"])  # fmt: skip
    name = os.path.splitext(str(tokens["names"][0]))[0].replace(os.sep, "__")
    png = np.asarray(Image.open(tmp_path / "recon" / f"{name}.png"), np.float32)
    decoded = np.clip((np.asarray(model.detokenize(want[:1]))[0] + 1) * 127.5, 0, 255)
    assert np.abs(png - decoded).max() <= 1.0  # PNG rounding

    codes = str(tmp_path / "codes_{split}.npz")
    extract_codes.main([
        f"--workdir={vq}", f"--out={codes}", "--data_source=folder", f"--data_path={photos}",
    ])  # fmt: skip
    train_codes = np.load(codes.format(split="train"))
    assert train_codes["codes"].shape == (6, 8, 8)
    np.testing.assert_array_equal(train_codes["label"], [0, 0, 0, 1, 1, 1])

    c = short_run(nar.get_config("digits_nar"), steps=4, batch_size=4)
    c.model.grid, c.model.vocab_size, c.model.num_classes = (8, 8), 256, 2
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
    c.data.path = codes
    s = c.evals.samples
    s.tokenizer_workdir, s.classifier_workdir = vq, ""
    s.samples_per_class, s.batch_size, s.grid_columns = 2, 4, 2
    s.buckets = False  # one loop body to compile; the samples are the same in every layout
    final = train.train_and_evaluate(c, str(tmp_path / "nar"), jax.devices()[:1])
    assert np.isfinite(final["train/loss"]) and final["samples/passes"] == 15  # 8 + 8 - 1
    grid = np.asarray(Image.open(tmp_path / "nar" / "samples_samples.png"))
    assert min(grid.shape[:2]) >= 2 * 32 and grid.std() > 1  # 2 x 2 decoded samples, not blank


def _write_flextok_vae(folder, shapes, scaling_factor=0.7):
    """The hub repository's layout: the weights beside diffusers' config.json."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    write_safetensors(path, diffusers_vae_state_dict(shapes, 0), {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "scaling_factor": scaling_factor}, f)
    return path


def test_converted_flextok_vae_matches_diffusers(tmp_path):
    """golden/flextok_vae_tiny.npz holds diffusers' AutoencoderKL outputs on these weights and
    images (golden/make_flextok_vae.py says how): the converted run's posterior moments and
    decoder agree within 1e-4 relative, and its latent scale is the repository's."""
    golden = np.load(os.path.join(GOLDEN, "flextok_vae_tiny.npz"))
    shapes = json.loads(str(golden["shapes"]))
    checkpoint = _write_flextok_vae(tmp_path / "hub", shapes)
    workdir = str(tmp_path / "vae")
    convert.main([
        "--from=flextok_vae", f"--checkpoint={checkpoint}", f"--workdir={workdir}",
        "--config.model.image_size=(32, 32)", "--config.model.dtype=float32",
    ])  # fmt: skip
    run = runs.load_run(workdir)
    model = run.module()
    assert run.config.model.latent_scale == pytest.approx(0.7)
    assert tuple(run.config.model.mults) == (1, 2) and run.config.model.latent_channels == 4
    mean, logvar = (np.asarray(a).transpose(0, 3, 1, 2) for a in model.moments(vq_images(3, 2, 32)))
    recon = np.asarray(model.decode_latents(golden["mean"].transpose(0, 2, 3, 1)))
    for got, want in (
        (mean, golden["mean"]),
        (logvar, golden["logvar"]),
        (recon.transpose(0, 3, 1, 2), golden["recon"]),
    ):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(model.encode(vq_images(3, 2, 32))), 0.7 * mean.transpose(0, 2, 3, 1), rtol=1e-6)  # fmt: skip


def test_safetensors_damage_is_a_one_line_error(tmp_path):
    golden = np.load(os.path.join(GOLDEN, "flextok_vae_tiny.npz"))
    checkpoint = _write_flextok_vae(tmp_path / "hub", json.loads(str(golden["shapes"])))
    data = open(checkpoint, "rb").read()
    for name, content, message in [
        ("cut.safetensors", data[: len(data) // 2], "truncated or corrupt"),
        (
            "junk.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
            "not a safetensors file",
        ),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit, match=message):
            convert.main(
                [
                    "--from=flextok_vae",
                    f"--checkpoint={tmp_path / name}",
                    f"--workdir={tmp_path / name}.run",
                ]
            )
        assert not os.path.exists(tmp_path / f"{name}.run")


# --- LlamaGen's and NAR's GPTs ----------------------------------------------------------------

GPT_RELEASES = {"nar": ("nar", "nar_gpt_tiny.npz"), "llamagen_gpt": ("ar", "llamagen_gpt_tiny.npz")}


@pytest.fixture(scope="module", params=sorted(GPT_RELEASES))
def gpt_golden(request):
    golden = np.load(os.path.join(GOLDEN, GPT_RELEASES[request.param][1]))
    return request.param, golden, json.loads(str(golden["shapes"]))


def _convert_gpt(tmp_path, release, state, name="gpt", *overrides):
    checkpoint = str(tmp_path / f"{name}.pt")
    write_torch_file(checkpoint, {"model": state, "steps": 1000})
    workdir = str(tmp_path / name)
    convert.main([
        f"--from={release}", f"--checkpoint={checkpoint}", f"--workdir={workdir}",
        "--config.model.grid=(4, 4)", "--config.model.dtype=float32", *overrides,
    ])  # fmt: skip
    return workdir


def test_converted_gpt_matches_the_release(tmp_path, gpt_golden):
    """golden/{nar,llamagen}_gpt_tiny.npz hold NAR's and LlamaGen's own GPTs' outputs on these
    weights (golden/make_llamagen_gpt.py says how). The converted run gives their training
    logits and the guided logits of every decoding pass within 1e-4 relative (its KV-cached
    passes and 2D RoPE against theirs), and their greedy samples token for token."""
    import jax

    from vitok.models.nar import sample

    release, golden, shapes = gpt_golden
    run = runs.load_run(_convert_gpt(tmp_path, release, gpt_state_dict(shapes, 0)))
    model = run.module()
    assert (model.order, model.vocab_size, model.num_classes) == (
        "neighbour" if release == "nar" else "raster", 64, 10,
    )  # fmt: skip
    labels, tokens = golden["labels"].astype(np.int32), golden["tokens"].astype(np.int32)
    logits = np.asarray(model(tokens.reshape(3, 4, 4), labels)).reshape(3, 16, 64)
    want = golden["train_logits"]
    assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max()

    cfg = float(golden["cfg_scale"])
    greedy = sample(model, labels, jax.random.key(0), temperature=0.0, cfg_scale=cfg)
    np.testing.assert_array_equal(np.asarray(greedy["tokens"]).reshape(3, 16), golden["greedy"])

    forced = sample(
        model, labels, jax.random.key(0), cfg_scale=cfg,
        teacher_tokens=golden["greedy"].reshape(3, 4, 4).astype(np.int32),
    )  # fmt: skip
    per_pass = np.asarray(forced["logits"])  # [S, B, T, V] in the schedule's target order
    got = np.zeros_like(golden["pass_logits"])
    for s, row in enumerate(model.schedule.target):
        for t, position in enumerate(row):
            if position < model.num_tokens:
                got[position] = per_pass[s, :, t]
    want = golden["pass_logits"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_gpt_layouts_are_the_releases(gpt_golden):
    """The layout each converter expects is the reference model's state_dict (the golden's
    table), and at the releases' sizes the parameter counts are the papers': NAR-B 130M
    beside LlamaGen-B 111M, LlamaGen-L 343M, NAR-L 372M."""
    release, _, shapes = gpt_golden
    extra = 1 if release == "nar" else 0
    name = "NAR" if extra else "LlamaGen GPT"
    dims = llamagen_gpt.read_dims(
        {k: np.zeros(v) for k, v in shapes.items()}, "golden", name, extra
    )
    assert llamagen_gpt.expected_layout(dims, extra) == {k: tuple(v) for k, v in shapes.items()}
    assert dims["num_heads"] == 2

    def count(width, depth, extra_blocks):
        dims = dict(width=width, depth=depth, mlp_dim=llamagen_gpt.swiglu_hidden(width),
                    vocab_size=16384, num_classes=1000)  # fmt: skip
        layout = llamagen_gpt.expected_layout(dims, extra_blocks)
        return sum(np.prod(s) for s in layout.values()) / 1e6

    assert 110 < count(768, 12, 0) < 112 and 342 < count(1024, 24, 0) < 344
    assert 128 < count(768, 12, 1) < 132 and 368 < count(1024, 24, 1) < 376


@pytest.mark.parametrize(
    "release, damage, message",
    [
        ("nar", lambda s: s.pop("layers.1.feed_forward.w3.weight"), "missing layers.1.feed_forward.w3.weight [512, 128]"),
        ("nar", lambda s: s.update({"layers.0.attention.wo.weight": np.zeros((128, 64), np.float32)}), "layers.0.attention.wo.weight is [128, 64], expected [128, 128]"),
        ("nar", lambda s: [s.pop(k) for k in ("medusa_norm.weight", "medusa_output.weight")], "converts with --from=llamagen_gpt"),
        ("llamagen_gpt", lambda s: s.update({"medusa_output.weight": np.zeros((64, 128), np.float32)}), "convert it with --from=nar"),
        ("llamagen_gpt", lambda s: s.pop("tok_embeddings.weight"), "has no 'tok_embeddings.weight'"),
    ],
)  # fmt: skip
def test_a_gpt_checkpoint_off_the_layout_is_refused(tmp_path, release, damage, message):
    shapes = json.loads(str(np.load(os.path.join(GOLDEN, GPT_RELEASES[release][1]))["shapes"]))
    state = gpt_state_dict(shapes, 0)
    damage(state)
    with pytest.raises(SystemExit) as exit:
        _convert_gpt(tmp_path, release, state)
    assert message in str(exit.value) and "\n" not in str(exit.value)
    assert not os.path.exists(tmp_path / "gpt")


# --- FlexTok ----------------------------------------------------------------------------------


def _write_flextok(path, shapes, config=None, drop=()):
    from tests.official_layouts import FLEXTOK_TINY_CONFIG, flextok_state_dict

    state = {k: v for k, v in flextok_state_dict(shapes, 0).items() if k not in drop}
    metadata = {k: str(v) for k, v in (config or FLEXTOK_TINY_CONFIG).items()}
    write_safetensors(str(path), state, metadata)
    return str(path)


@pytest.fixture(scope="module")
def flextok_run(tmp_path_factory):
    """The golden's random-weight FlexTok release converted once (and its VAE as DIR/vae)."""
    golden = np.load(os.path.join(GOLDEN, "flextok_tiny.npz"))
    tmp = tmp_path_factory.mktemp("flextok")
    checkpoint = _write_flextok(tmp / "model.safetensors", json.loads(str(golden["shapes"])))
    workdir = str(tmp / "flextok")
    convert.main([
        "--from=flextok", f"--checkpoint={checkpoint}", f"--workdir={workdir}",
        "--config.model.dtype=float32",
    ])  # fmt: skip
    return golden, workdir


def test_converted_flextok_matches_the_release(flextok_run):
    """golden/flextok_tiny.npz holds apple/ml-flextok's own FlexTok outputs on these weights,
    images and noise (golden/make_flextok.py says how). The converted run tokenizes the images
    to the same ids (VAE, encoder, FSQ); one decoder call gives the release's velocity within
    1e-5 relative with 16 and 3 tokens kept and with the null condition; and its sampler, fed
    the same noise, ends at the release's latents without guidance, with CFG 3.0 and with APG
    7.5 (within 1e-5 relative after 3-4 Euler steps), and at its images through the VAE."""
    import jax
    import jax.numpy as jnp

    from vitok.models.vit import patchify, unpatchify

    golden, workdir = flextok_run
    model = runs.load_run(workdir).module()
    assert (model.num_registers, model.codebook_size, model.grid) == (16, 8 * 5 * 5 * 5, (8, 8))
    ids = np.asarray(model.tokenize(vq_images(1, 2, 32)))
    np.testing.assert_array_equal(ids, golden["ids"])

    def close(got, want, what):  # measured: at most 1.7e-6
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-5, (what, err)

    to_patches = lambda nchw: patchify(jnp.asarray(nchw.transpose(0, 2, 3, 1)), 2)  # noqa: E731
    to_nchw = lambda p: np.asarray(unpatchify(p, (8, 8), 2)).transpose(0, 3, 1, 2)  # noqa: E731
    noise = to_patches(golden["noise"])
    codes = model.fsq.ids_to_codes(jnp.asarray(ids))
    for k, name in ((16, "velocity_k16"), (3, "velocity_k3"), (0, "velocity_null")):
        keep = jnp.arange(16)[None].repeat(2, 0) < k
        v = model.velocity(noise, jnp.ones((2,)), model.condition(codes, keep))
        close(to_nchw(v), golden[name], name)
    for name, (k, steps, guidance, apg) in {
        "full": (16, 4, 1.0, False), "cfg": (5, 3, 3.0, False), "apg": (3, 4, 7.5, True),
    }.items():  # fmt: skip
        keep = jnp.arange(16)[None].repeat(2, 0) < k
        x0 = model.sample_space(
            codes, keep, jax.random.key(0), steps=steps, guidance=guidance, apg=apg, noise=noise
        )
        close(to_nchw(x0), golden[f"sample_{name}"], name)
    images = np.asarray(model.from_space(x0)).transpose(0, 3, 1, 2)
    close(images, golden["images_apg"], "images_apg")


@pytest.mark.slow
def test_a_converted_flextok_serves_the_tools_and_fine_tunes(flextok_run, tmp_path):
    """The FlexTok half of the official-weights workflow on the random-weight release: its
    run tokenizes a folder (the ids of ``tokenize``), detokenizes the first k tokens with
    guidance and APG (the PNGs are ``detokenize``'s images), extracts 1D codes for a generator,
    and trains from the converted run (init_from), its frozen VAE loaded from DIR/vae and left
    unchanged."""
    import jax
    from helpers import short_run
    from ml_collections import ConfigDict
    from PIL import Image

    from vitok import train
    from vitok.tools import detokenize, extract_codes

    golden, workdir = flextok_run
    run = runs.load_run(workdir)
    model = run.module()
    assert run.config.model.vae.checkpoint == os.path.join(os.path.abspath(workdir), "vae")
    photos = tmp_path / "photos"
    tokens, want = _tokenize_labelled_photos(workdir, model, photos, tmp_path / "t.npz", 6, 4)
    assert tokens["tokens"].shape == (6, 16)

    detokenize.main([
        f"--workdir={workdir}", f"--tokens={tmp_path / 't.npz'}", f"--out={tmp_path / 'recon'}",
        "--k=4", "--steps=3", "--guidance=7.5", "--apg", "--batch_size=8",
    ])  # fmt: skip
    name = os.path.splitext(str(tokens["names"][0]))[0].replace(os.sep, "__")
    png = np.asarray(Image.open(tmp_path / "recon" / f"{name}_k4.png"), np.float32)
    from vitok.inference import Tokenizer

    images = Tokenizer.from_workdir(workdir).detokenize(
        want[:, :4], seed=0, steps=3, guidance=7.5, apg=True
    )
    assert np.abs(png - images[0].astype(np.float32)).max() <= 1.0

    codes = str(tmp_path / "codes_{split}.npz")
    extract_codes.main([
        f"--workdir={workdir}", f"--out={codes}", "--data_source=folder", f"--data_path={photos}",
    ])  # fmt: skip
    np.testing.assert_array_equal(np.load(codes.format(split="train"))["codes"].shape, (4, 16))

    c = short_run(ConfigDict(run.config.to_dict()), steps=2, batch_size=4)
    c.init_from.workdir = workdir
    c.data = ConfigDict({"source": "folder", "path": str(photos / "train"), "split": "train",
                         "pp": "decode(channels=3)|value_range(-1, 1)"})  # fmt: skip
    c.evals = ConfigDict()
    c.mesh.data, c.mesh.fsdp = 1, 1
    final = train.train_and_evaluate(c, str(tmp_path / "tuned"), jax.devices()[:1])
    assert np.isfinite(final["train/loss"])
    tuned = runs.load_run(str(tmp_path / "tuned"))
    vae_before = runs.load_run(os.path.join(workdir, "vae")).params
    after = jax.tree.leaves(tuned.extra["vae"])
    assert all(
        np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(vae_before), strict=True)
    )


def _damaged_config(module, key, value):
    from tests.official_layouts import FLEXTOK_TINY_CONFIG

    config = json.loads(json.dumps(FLEXTOK_TINY_CONFIG))
    config["decoder"]["module_dict"][module][key] = value
    return config


@pytest.mark.parametrize(
    "metadata, drop, message",
    [
        ("none", (), "carries no FlexTok config for ['vae', 'encoder', 'decoder', 'regularizer', 'pipeline']"),
        (_damaged_config("dec_to_patches", "_target_", "flextok.model.postprocessors.heads.MLPHead"), (), "decoder module 'dec_to_patches' is a MLPHead, which vitok does not map"),
        (_damaged_config("dec_transformer", "qk_norm", False), (), "the decoder FlexTransformer has qk_norm=False; vitok maps only qk_norm=True"),
        (None, ("decoder.module_dict.dec_latent_dropout.nullcond",), "missing decoder.module_dict.dec_latent_dropout.nullcond [128]"),
    ],
)  # fmt: skip
def test_a_flextok_checkpoint_off_the_layout_is_refused(tmp_path, metadata, drop, message):
    shapes = json.loads(str(np.load(os.path.join(GOLDEN, "flextok_tiny.npz"))["shapes"]))
    path = tmp_path / "model.safetensors"
    if metadata == "none":
        write_safetensors(
            str(path), {k: np.zeros(v, np.float32) for k, v in shapes.items()}, {"format": "pt"}
        )
    else:
        _write_flextok(path, shapes, metadata, drop)
    with pytest.raises(SystemExit) as exit:
        convert.main(["--from=flextok", f"--checkpoint={path}", f"--workdir={tmp_path / 'run'}"])
    assert message in str(exit.value) and "\n" not in str(exit.value)
    assert not os.path.exists(tmp_path / "run")


def test_evaluate_takes_keys_an_evaluator_declares_and_refuses_others(flextok_run, capsys):
    """``--config.evals.recon.inception_weights=...`` on a run whose section has no such key
    (the converted FlexTok) is the evaluator's declared option, applied; a typo is one line."""
    from vitok.tools.evaluate import _declared_evaluator_keys

    _, workdir = flextok_run
    config = runs.load_config(workdir)
    rest = _declared_evaluator_keys(
        config, ["--config.evals.recon.inception_weights=/w.pth", "--config.seed=3"]
    )
    assert config.evals.recon.inception_weights == "/w.pth" and rest == ["--config.seed=3"]
    assert config.evals.recon.apg is True and config.evals.recon.guidance == 7.5
    from vitok.tools import evaluate

    with pytest.raises(SystemExit) as exit:
        evaluate.main([f"--workdir={workdir}", "--config.evals.recon.inception_weightz=x"])
    assert str(exit.value) == "vitok.tools.evaluate: unknown config key 'inception_weightz'"
