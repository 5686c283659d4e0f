"""NAR and raster AR: the neighbour mask, head mixing, the decoding schedule, the KV-cached
sampler against the full forward, pass counts, sampling filters and sharded training."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitok.models.nar import (
    TokenGenerator,
    filter_logits,
    guide,
    head_sources,
    make_schedule,
    pass_segments,
    sample,
)
from vitok.nn.attention import CausalMask, NeighbourMask, attention


def reference_neighbour_mask(rows: int, cols: int) -> np.ndarray:
    """Hand-built: [class; (r, c) raster] -> the class token sees itself; (r, c) sees the class
    token and every (r', c') with r' + c' <= r + c."""
    n = 1 + rows * cols
    mask = np.zeros((n, n), bool)
    mask[0, 0] = True
    for r, c in itertools.product(range(rows), range(cols)):
        q = 1 + r * cols + c
        mask[q, 0] = True
        for r2, c2 in itertools.product(range(rows), range(cols)):
            mask[q, 1 + r2 * cols + c2] = r2 + c2 <= r + c
    return mask


@pytest.mark.parametrize("grid", [(3, 4), (5, 2), (1, 6)])
def test_neighbour_mask_matches_hand_built_reference(grid):
    n = 1 + grid[0] * grid[1]
    np.testing.assert_array_equal(NeighbourMask(grid).dense(n, n), reference_neighbour_mask(*grid))


def test_neighbour_mask_on_a_line_is_the_causal_mask():
    np.testing.assert_array_equal(NeighbourMask((9,)).dense(10, 10), CausalMask().dense(10, 10))


@pytest.mark.parametrize("backend", ["chunked", "sequence_parallel"])
def test_backends_agree_with_dense_under_the_neighbour_mask(backend):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 21, 2, 8))
    mask = NeighbourMask((4, 5))
    dense = attention(q, k, v, mask, backend="dense")
    np.testing.assert_allclose(attention(q, k, v, mask, backend=backend), dense, atol=1e-5)


def test_head_sources_follow_the_paper():
    src = head_sources((3, 4))  # head 0 reads the left neighbour, head 1 the upper one
    pos = lambda r, c: 1 + r * 4 + c  # noqa: E731
    assert list(src[0]) == [0, 0]  # the corner reads the class token through both heads
    assert list(src[2]) == [pos(0, 1), -1]  # first row: the row head only
    assert list(src[8]) == [-1, pos(1, 0)]  # first column: the column head only
    assert list(src[6]) == [pos(1, 1), pos(0, 2)]  # interior (1, 2): both


def small_generator(grid=(4, 5), order="neighbour", scan_layers=False, seed=0):
    model = TokenGenerator(
        grid=grid,
        vocab_size=13,
        num_classes=3,
        order=order,
        width=32,
        depth=2,
        num_heads=4,
        scan_layers=scan_layers,
        rngs=nnx.Rngs(seed),
    )
    for head in model.heads:  # head 0 starts at zero; give it weights so it matters
        head.kernel[...] = 0.3 * jax.random.normal(jax.random.key(seed + 1), head.kernel.shape)
    return model


def test_training_logits_are_the_mean_of_the_heads_that_reach_a_token():
    """Interior logits = (row head at the left neighbour + column head at the upper one) / 2,
    computed here by running the blocks and heads by hand."""
    model = small_generator()
    tokens = jax.random.randint(jax.random.key(2), (2, 4, 5), 0, 13)
    labels = jnp.array([1, 3])  # 3 = the null class

    @jax.jit
    def by_model_and_by_hand(tokens, labels):
        seq = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tokens.reshape(2, -1)], 1)
        x = model._embed(labels, seq, jnp.arange(21))
        for block in model.blocks:
            x = block(x, model.mask)
        row = model.heads[0](model.head_norms[0](x))
        col = model.heads[1](model.head_norms[1](model.extra_blocks[0](x, model.mask)))
        return model(tokens, labels), row, col

    logits, row, col = by_model_and_by_hand(tokens, labels)
    pos = lambda r, c: 1 + r * 5 + c  # noqa: E731
    np.testing.assert_allclose(logits[:, 0, 0], (row[:, 0] + col[:, 0]) / 2, atol=1e-5)
    np.testing.assert_allclose(logits[:, 0, 3], row[:, pos(0, 2)], atol=1e-5)
    np.testing.assert_allclose(logits[:, 2, 0], col[:, pos(1, 0)], atol=1e-5)
    np.testing.assert_allclose(
        logits[:, 2, 3], (row[:, pos(2, 2)] + col[:, pos(1, 3)]) / 2, atol=1e-5
    )


def test_logits_up_to_a_diagonal_do_not_depend_on_tokens_from_it_on():
    model = small_generator(grid=(4, 4))
    tokens = jax.random.randint(jax.random.key(3), (1, 4, 4), 0, 13)
    forward = jax.jit(lambda t: model(t, jnp.array([0])))
    base = forward(tokens)
    diag = np.add.outer(np.arange(4), np.arange(4))
    for d in range(7):
        changed = jnp.where(jnp.asarray(diag >= d), (tokens + 5) % 13, tokens)
        out = forward(changed)
        np.testing.assert_allclose(out[0][diag <= d], base[0][diag <= d], atol=1e-5)
        if d < 6:  # the next diagonal does depend on this one
            assert np.abs(out[0][diag == d + 1] - base[0][diag == d + 1]).max() > 1e-4


@pytest.mark.parametrize(
    "grid,order,passes",
    [((4, 5), "neighbour", 8), ((16, 16), "neighbour", 31), ((4, 5), "raster", 20),
     ((3, 4, 4), "neighbour", 2 * 4 + 3 - 2), ((7,), "raster", 7)],
)  # fmt: skip
def test_schedule_emits_every_token_once_after_its_sources(grid, order, passes):
    from vitok.models.nar import decode_grid

    schedule = make_schedule(decode_grid(grid, order))
    n = int(np.prod(grid))
    assert schedule.num_passes == passes
    emitted = schedule.target[schedule.target < n]
    assert sorted(emitted.tolist()) == list(range(n))
    known = set()
    for s in range(passes):
        fed = [p - 1 for p in schedule.feed[s] if 1 <= p <= n]
        assert set(fed) <= known  # only generated tokens are fed
        known |= {int(t) for t in schedule.target[s] if t < n}


@pytest.mark.parametrize(
    "grid,order,scan_layers,buckets",
    [((4, 5), "neighbour", False, True), ((4, 5), "neighbour", True, False),
     ((4, 5), "raster", False, True), ((2, 3, 3), "neighbour", True, True)],
)  # fmt: skip
def test_kv_cached_decoding_matches_the_full_forward_at_every_pass(
    grid, order, scan_layers, buckets
):
    model = small_generator(grid, order, scan_layers)
    tokens = jax.random.randint(jax.random.key(4), (2, *grid), 0, 13)
    labels = jnp.array([0, 2])
    full = model(tokens, labels).reshape(2, -1, 13)
    out = jax.jit(lambda t: sample(model, labels, jax.random.key(5), teacher_tokens=t,
                                   buckets=buckets))(tokens)  # fmt: skip
    schedule = model.schedule
    assert int(out["passes"]) == schedule.num_passes
    np.testing.assert_array_equal(out["tokens"], tokens)
    checked = 0
    for s in range(schedule.num_passes):
        for t, j in enumerate(schedule.target[s]):
            if j < model.num_tokens:
                np.testing.assert_allclose(out["logits"][s, :, t], full[:, j], atol=2e-5)
                checked += 1
    assert checked == model.num_tokens


def test_guided_decoding_matches_guided_full_forward():
    model = small_generator((3, 3))
    tokens = jax.random.randint(jax.random.key(6), (2, 3, 3), 0, 13)
    labels = jnp.array([0, 1])
    null = jnp.full((2,), 3)
    want = guide(jnp.concatenate([model(tokens, labels), model(tokens, null)]), 3.0)
    out = sample(model, labels, jax.random.key(0), cfg_scale=3.0, teacher_tokens=tokens)
    schedule = model.schedule
    for s in range(schedule.num_passes):
        for t, j in enumerate(schedule.target[s]):
            if j < 9:
                np.testing.assert_allclose(
                    out["logits"][s, :, t], want.reshape(2, 9, 13)[:, j], atol=2e-5
                )


def test_sampling_counts_passes_and_buckets_do_not_change_samples():
    model = small_generator((6, 6))
    labels = jnp.array([0, 1, 2])
    one_loop = sample(model, labels, jax.random.key(7), buckets=False, top_k=5)
    bucketed = sample(model, labels, jax.random.key(7), buckets=True, top_k=5)
    assert int(one_loop["passes"]) == int(bucketed["passes"]) == 11
    np.testing.assert_array_equal(one_loop["tokens"], bucketed["tokens"])
    widths = [w for _, _, w in pass_segments(model.schedule, 11)]
    assert widths == [1, 2, 4, 6, 4, 2]  # padded rows shrink on short diagonals

    raster = small_generator((6, 6), "raster")
    assert int(sample(raster, labels, jax.random.key(7))["passes"]) == 36
    line = small_generator((10,), "raster")
    prefix = sample(line, labels, jax.random.key(8), num_tokens=4)
    assert int(prefix["passes"]) == 4
    assert (prefix["tokens"][:, 4:] == 0).all()
    with pytest.raises(ValueError, match="num_tokens"):
        sample(model, labels, jax.random.key(0), num_tokens=3)


def test_greedy_sampling_picks_the_argmax_of_the_guided_logits():
    model = small_generator((3, 3))
    labels = jnp.array([2])
    out = sample(model, labels, jax.random.key(0), temperature=0.0, cfg_scale=1.5)
    tokens = out["tokens"]
    logits = guide(jnp.concatenate([model(tokens, labels), model(tokens, jnp.array([3]))]), 1.5)
    np.testing.assert_array_equal(logits.argmax(-1), tokens)  # self-consistent greedy decode


def test_top_k_and_top_p_keep_the_right_sets():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x[0]))))  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.65)) == {1, 3}  # 0.4 + 0.3 reaches 0.65
    assert kept(filter_logits(logits, top_p=0.75)) == {1, 3, 4}
    assert kept(filter_logits(logits, top_k=4, top_p=1.0)) == {1, 2, 3, 4}


def test_bad_sampling_options_and_labels_are_clear_errors():
    model = small_generator((3, 3))
    key, labels = jax.random.key(0), jnp.array([0, 1])
    for options, message in [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample(model, labels, key, **options)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\]"):
        sample(model, jnp.array([0, 4]), key)


def test_wrong_grid_and_bad_order_are_clear_errors():
    model = small_generator((4, 5))
    with pytest.raises(ValueError, match=r"token grids \[B, \(4, 5\)\]"):
        model(jnp.zeros((1, 5, 4), jnp.int32), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="model.order"):
        small_generator((4, 5), order="spiral")


# --- the pipeline: tokenizer -> codes on disk -> sharded generator training -> samples judged ---


def _small_tokenizer_config():
    from configs import vae

    c = vae.get_config("mnist_fsq")
    c.total_steps = 3
    c.batch_size = 16
    c.log_every = 1
    c.eval_every = 3
    c.checkpoint_every = 3
    c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
    c.evals.recon.max_examples = 32
    c.evals.recon.batch_size = 32
    c.peak_flops_per_device = 1e9
    return c


@pytest.fixture(scope="module")
def digit_codes(tmp_path_factory):
    """A (tiny, briefly trained) tokenizer run and the codes it writes for both splits."""
    from vitok import train
    from vitok.tools import extract_codes

    root = tmp_path_factory.mktemp("tokens")
    train.train_and_evaluate(_small_tokenizer_config(), str(root / "tokenizer"))
    out = str(root / "codes_{split}.npz")
    extract_codes.main(["--workdir", str(root / "tokenizer"), "--out", out, "--batch_size", "500"])
    return root, out


def test_extracted_codes_are_the_tokenizers_codes_of_every_digit(digit_codes):
    from vitok.data.sources import CodesSource, Mnist5kSource
    from vitok.tools.extract_codes import CodeExtractor

    root, out = digit_codes
    test = CodesSource(path=out, split="test")
    digits = Mnist5kSource(split="test")
    assert len(test) == len(digits) == 1000 and len(CodesSource(path=out, split="train")) == 4000
    assert test[0]["codes"].shape == (7, 7) and test[0]["codes"].dtype == np.int32
    np.testing.assert_array_equal([test[i]["label"] for i in range(50)], digits.labels[:50])
    extractor = CodeExtractor(str(root / "tokenizer"))
    images = np.stack([digits[i]["image"] for i in range(8)]).astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(extractor(images), [test[i]["codes"] for i in range(8)])


def test_codes_that_do_not_fit_the_generator_are_refused_before_training(digit_codes):
    from configs import nar
    from vitok.tasks.generation import GenerationTask

    _, codes = digit_codes
    for field, value, message in [
        ("vocab_size", 100, "256-entry codebook"),
        ("grid", (8, 8), "the codes are"),
        ("num_classes", 5, "labels go up to 9"),
    ]:
        c = nar.get_config("digits_nar")
        c.data.path = codes
        c.model[field] = value
        with pytest.raises(ValueError, match=message):
            GenerationTask(c)


def test_codes_source_names_a_missing_or_corrupt_file(tmp_path):
    from vitok.data.sources import CodesSource

    with pytest.raises(FileNotFoundError, match="extract_codes"):
        CodesSource(path=str(tmp_path / "none_{split}.npz"), split="train")
    bad = tmp_path / "bad_train.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a codes file"):
        CodesSource(path=str(tmp_path / "bad_{split}.npz"), split="train")


def test_generator_trains_sharded_and_its_samples_are_judged(digit_codes, tmp_path):
    """NAR on the 8-device mesh (data 4 x fsdp 2) on real codes: the loss falls, parameters
    are sharded, and the generation evaluator decodes, classifies and grids the samples."""
    from configs import nar
    from tests.conftest import small_vit_config
    from vitok import train

    root, codes = digit_codes
    classifier = str(tmp_path / "classifier")
    train.train_and_evaluate(small_vit_config(total_steps=2, eval_every=2), classifier)
    c = nar.get_config("digits_nar")
    c.total_steps = 12
    c.batch_size = 32
    c.log_every = 1
    c.eval_every = 12
    c.checkpoint_every = 12
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 1, 2, 64
    c.data.path = codes
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 1
    c.mesh.data, c.mesh.fsdp = 4, 2
    s = c.evals.samples
    s.tokenizer_workdir = str(root / "tokenizer")
    s.classifier_workdir = classifier
    s.samples_per_class, s.batch_size, s.grid_columns = 2, 16, 2  # 20 samples, 2 batches
    s.max_examples = 64
    workdir = str(tmp_path / "nar")
    final = train.train_and_evaluate(c, workdir)

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    assert final["samples/passes"] == 13  # 7 + 7 - 1
    assert 0.0 <= final["samples/class_accuracy"] <= 1.0 and final["samples/fid"] > 0
    assert os.path.exists(os.path.join(workdir, "samples_samples.png"))


def test_gpt_over_flextok_tokens_samples_k_tokens_and_decodes_them(tmp_path):
    """FlexTok run -> its 1D codes on disk -> a class-conditional GPT (raster AR on a line)
    -> k sampled tokens decoded by FlexTok's flow decoder."""
    from configs import nar
    from tests.conftest import small_flextok_config
    from vitok import train
    from vitok.data.sources import CodesSource
    from vitok.tools import extract_codes

    flextok = str(tmp_path / "flextok")
    train.train_and_evaluate(small_flextok_config(), flextok)
    codes = str(tmp_path / "photos_{split}.npz")
    extract_codes.main(["--workdir", flextok, "--out", codes, "--num_examples", "64"])
    train_codes = CodesSource(path=codes, split="train")
    assert train_codes[0]["codes"].shape == (4,) and len(train_codes) == 64
    assert {int(train_codes[i]["label"]) for i in range(16)} == set(range(8))  # photo index

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
    final = train.train_and_evaluate(c, str(tmp_path / "gpt"))
    assert final["samples/passes"] == 2  # k tokens, k passes
    assert os.path.exists(tmp_path / "gpt" / "samples_samples.png")
