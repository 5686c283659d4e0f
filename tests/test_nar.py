"""NAR and raster AR: the neighbour mask, head mixing, the decoding schedule, the KV-cached
sampler against the full forward, pass counts, sampling filters and sharded training."""

import itertools

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


LLAMA = dict(norm="rms", mlp="swiglu", use_bias=False, posemb="rope2d")  # the releases' block


def small_generator(grid=(4, 5), order="neighbour", scan_layers=False, seed=0, **layers):
    model = TokenGenerator(
        **layers,
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


@pytest.mark.parametrize("layers", [{}, LLAMA], ids=["vit_block", "llama_rope"])
def test_logits_up_to_a_diagonal_do_not_depend_on_tokens_from_it_on(layers):
    model = small_generator(grid=(4, 4), **layers)
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
    "grid,order,scan_layers,buckets,layers",
    [((4, 5), "neighbour", False, True, {}), ((4, 5), "neighbour", False, "exact", {}),
     ((4, 5), "raster", False, False, {}), ((2, 3, 3), "neighbour", True, True, {}),
     ((4, 5), "neighbour", True, True, LLAMA)],
)  # fmt: skip
@pytest.mark.slow
def test_kv_cached_decoding_matches_the_full_forward_at_every_pass(
    grid, order, scan_layers, buckets, layers
):
    model = small_generator(grid, order, scan_layers, **layers)
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


@pytest.mark.slow
def test_sampling_counts_passes_and_buckets_do_not_change_samples():
    model = small_generator((4, 5))
    labels = jnp.array([0, 1, 2])
    one_loop = sample(model, labels, jax.random.key(7), buckets=False, top_k=5)
    bucketed = sample(model, labels, jax.random.key(7), buckets=True, top_k=5)
    exact = sample(model, labels, jax.random.key(7), buckets="exact", top_k=5)
    assert int(one_loop["passes"]) == int(bucketed["passes"]) == int(exact["passes"]) == 8
    np.testing.assert_array_equal(one_loop["tokens"], bucketed["tokens"])
    np.testing.assert_array_equal(one_loop["tokens"], exact["tokens"])
    square = make_schedule((6, 6))
    widths = [w for _, _, w in pass_segments(square, 11)]
    assert widths == [1, 2, 4, 6, 4, 2]  # padded rows shrink on short diagonals
    # Exact widths: pass s >= 1 feeds diagonal s - 1 and emits diagonal s, so it needs
    # max(len(diagonal s - 1), len(diagonal s)) rows: 2, 3, ..., 6, 6, 5, ..., 2 on 6 x 6.
    runs = pass_segments(square, 11, "exact")
    assert [w for _, _, w in runs] == [1, 2, 3, 4, 5, 6, 5, 4, 3, 2]
    assert sum((hi - lo) * w for lo, hi, w in runs) == 1 + sum(range(2, 7)) + 6 + sum(range(2, 6))
    with pytest.raises(ValueError, match="buckets must be"):
        pass_segments(square, 11, "pow3")

    line = small_generator((10,), "raster")
    prefix = sample(line, labels, jax.random.key(8), num_tokens=4)
    assert int(prefix["passes"]) == 4
    assert (prefix["tokens"][:, 4:] == 0).all()
    with pytest.raises(ValueError, match="num_tokens"):
        sample(model, labels, jax.random.key(0), num_tokens=3)


@pytest.mark.slow
def test_greedy_guided_sampling_picks_the_argmax_of_the_guided_full_forward():
    """Every token of a greedy CFG sample is the argmax of the guided logits the full forward
    gives for that sample: the cached, guided decoding path agrees with training's."""
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
    with pytest.raises(ValueError, match=r"2D RoPE needs a 2D token grid, got \(7,\)"):
        small_generator((7,), order="raster", posemb="rope2d")
    for key, value, message in (
        ("posemb", "sincos", "unknown posemb 'sincos'"),
        ("norm", "batch", "unknown norm 'batch'"),
        ("mlp", "relu", "unknown mlp 'relu'"),
    ):
        with pytest.raises(ValueError, match=message):
            small_generator((4, 5), **{key: value})
