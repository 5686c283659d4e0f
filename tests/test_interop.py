"""Released checkpoints converted into vitok runs, against the reference implementations."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.official_layouts import FLEXIVIT_TINY, flexivit_arrays, flexivit_images
from vitok import runs
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
