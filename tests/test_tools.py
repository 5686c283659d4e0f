"""tokenize / detokenize command lines over a folder of real photos and a trained checkpoint."""

import os

import jax
import numpy as np
import pytest
from helpers import small_flextok_config
from PIL import Image

from vitok import train
from vitok.data import sources
from vitok.inference import Tokenizer
from vitok.tools import detokenize, tokenize

pytestmark = pytest.mark.slow  # trains and tokenizes end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("flextok_run"))
    config = small_flextok_config(**{"total_steps": 2, "checkpoint_every": 2, "eval_every": 2})
    train.train_and_evaluate(config, workdir, jax.devices()[:1])  # sharding: tested elsewhere
    return workdir


def _photo_folder(path, size=16, n=3):
    source = sources.PhotoCropsSource(split="test", crop_size=size, num_examples=n)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        Image.fromarray(source[i]["image"]).save(os.path.join(path, f"img{i}.png"))
    return path


def test_tokenize_then_detokenize_round_trip(trained, tmp_path):
    folder = _photo_folder(str(tmp_path / "photos"))
    tokens_path = str(tmp_path / "tokens.npz")
    tokenize.main(["--workdir", trained, "--images", folder, "--out", tokens_path])
    with np.load(tokens_path) as data:
        tokens, names = data["tokens"], list(data["names"])
    assert tokens.shape == (3, 4) and tokens.dtype == np.int32
    assert names == ["img0.png", "img1.png", "img2.png"]
    # The command line and the Python API agree.
    tokenizer = Tokenizer.from_workdir(trained)
    images = np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in names])
    np.testing.assert_array_equal(tokenizer.tokenize(images), tokens)

    out = str(tmp_path / "recon")
    detokenize.main(
        ["--workdir", trained, "--tokens", tokens_path, "--out", out, "--k", "1,4", "--steps", "2"]
    )
    written = sorted(os.listdir(out))
    assert written == sorted(f"img{i}_k{k}.png" for i in range(3) for k in (1, 4))
    with Image.open(os.path.join(out, "img0_k4.png")) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    expected = tokenizer.detokenize(tokens[:, :4], steps=2)
    np.testing.assert_array_equal(
        np.asarray(Image.open(os.path.join(out, "img0_k4.png"))), expected[0]
    )


def test_tools_reject_bad_input_with_clear_messages(trained, tmp_path):
    tokenizer = Tokenizer.from_workdir(trained)
    with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\].*got \(1, 32, 32, 3\)"):
        tokenizer.tokenize(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1 <= k <= 4, got \(1, 5\)"):
        tokenizer.detokenize(np.zeros((1, 5), np.int32))
    with pytest.raises(ValueError, match=r"lie in \[0, 15\)"):
        tokenizer.detokenize(np.asarray([[0, 99]]))

    big = _photo_folder(str(tmp_path / "big"), size=32, n=1)
    with pytest.raises(SystemExit, match="img0.png: image is 32x32, the tokenizer takes 16x16"):
        tokenize.main(["--workdir", trained, "--images", big, "--out", str(tmp_path / "t.npz")])
    tokenize.main(
        ["--workdir", trained, "--images", big, "--out", str(tmp_path / "t.npz"), "--resize"]
    )
    with np.load(tmp_path / "t.npz") as data:
        assert data["tokens"].shape == (1, 4)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit, match="broken.png"):
        tokenize.main(["--workdir", trained, "--images", str(corrupt), "--out", "x.npz"])
    with pytest.raises(SystemExit, match="config.json not found"):
        tokenize.main(["--workdir", str(tmp_path), "--images", big, "--out", "x.npz"])


def test_gpt_over_flextok_tokens_samples_k_tokens_and_decodes_them(trained, tmp_path):
    """FlexTok run -> its 1D codes on disk -> a class-conditional GPT (raster AR on a line)
    -> k sampled tokens decoded by FlexTok's flow decoder."""
    from configs import nar
    from vitok.data import sources
    from vitok.data.sources import CodesSource
    from vitok.tools import extract_codes

    flextok = trained  # the FlexTok run of this module
    codes = str(tmp_path / "photos_{split}.npz")
    extract_codes.main(["--workdir", flextok, "--out", codes, "--num_examples", "64"])
    train_codes = CodesSource(path=codes, split="train")
    assert train_codes[0]["codes"].shape == (4,) and len(train_codes) == 64
    photos = len(sources.PHOTO_SPLITS[nar.flextok_tiny_split()])
    assert {int(train_codes[i]["label"]) for i in range(16)} == set(range(photos))  # photo index

    c = nar.get_config("photos_flextok_gpt")
    c.total_steps = c.eval_every = c.checkpoint_every = 2
    c.batch_size = 16
    c.model.grid = (4,)
    c.model.vocab_size = 15  # the small FlexTok's FSQ levels (5, 3)
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
    c.data.path = codes
    s = c.evals.samples
    s.tokenizer_workdir = flextok
    s.num_tokens, s.decode_steps = 2, 2
    s.samples_per_class, s.batch_size, s.grid_columns = 1, 8, 1
    final = train.train_and_evaluate(c, str(tmp_path / "gpt"), jax.devices()[:1])
    assert final["samples/passes"] == 2  # k tokens, k passes

    # A second path to the same picture: the trained GPT's own sampler draws the first batch's
    # 2 tokens per class with the evaluator's key, FlexTok's decoder renders them, and the
    # result must be the grid's tiles (one class per row) up to the PNG's rounding.
    import jax.numpy as jnp

    from vitok import runs
    from vitok.evaluators import evaluator_options
    from vitok.evaluators.generation import GenerationEvaluator
    from vitok.models.base import pad_ids
    from vitok.models.nar import sample

    o = evaluator_options(c.evals.samples, GenerationEvaluator.OPTIONS)
    options = {k: o[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")}
    gpt = runs.load_run(str(tmp_path / "gpt")).module()
    decoder = Tokenizer.from_workdir(flextok).model
    sample_rng, decode_rng = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
    labels = jnp.arange(8, dtype=jnp.int32)
    drawn = jax.jit(lambda: sample(gpt, labels, sample_rng, num_tokens=2, **options))()
    ids = drawn["tokens"][:, :2]
    assert ids.shape == (8, 2) and int(ids.min()) >= 0 and int(ids.max()) < 15
    images = jax.jit(lambda: decoder.detokenize(pad_ids(ids, 4), decode_rng, steps=2))()
    expected = np.round((np.clip(np.asarray(images), -1, 1) + 1) / 2 * 255)
    grid = np.asarray(Image.open(tmp_path / "gpt" / "samples_samples.png").convert("RGB"))
    tiles = np.stack([grid[2 + i * 18 : 2 + i * 18 + 16, 2:18] for i in range(8)])
    assert np.abs(tiles.astype(int) - expected).max() <= 1
    assert len({tuple(row) for row in np.asarray(ids)}) > 1  # the classes drew different tokens
