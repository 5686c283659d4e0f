"""Every attention backend against the dense reference, for values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitok import sharding
from vitok.nn import attention as attn
from vitok.nn import flash
from vitok.nn.flash import chunked_attention, fit_chunk

MASKS = [attn.FullMask(), attn.CausalMask()]


def qkv(b=2, lq=37, lk=37, h=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, lq, h, d)).astype(np.float32)
    k = rng.normal(size=(b, lk, h, d)).astype(np.float32)
    v = rng.normal(size=(b, lk, h, d)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def loss_and_grads(fn, q, k, v):
    w = jnp.asarray(
        np.random.default_rng(9).normal(size=q.shape[:2] + (q.shape[2], v.shape[3])), jnp.float32
    )
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal"])
@pytest.mark.parametrize("chunks", [(8, 8), (16, 5)], ids=["8x8", "16x5"])
@pytest.mark.parametrize(
    "lengths",
    [(37, 37), (13, 29), (36, 24), (36, 23)],
    ids=["self", "cached", "fitted_blocks", "masked_rows_and_padding"],
)
def test_chunked_matches_dense(mask, chunks, lengths):
    q, k, v = qkv(lq=lengths[0], lk=lengths[1])
    dense = lambda q, k, v: attn.attention(q, k, v, mask, backend="dense")  # noqa: E731
    chunked = lambda q, k, v: chunked_attention(q, k, v, mask, q_chunk=chunks[0], k_chunk=chunks[1])  # noqa: E731
    np.testing.assert_allclose(chunked(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-5)
    (la, ga), (lb, gb) = loss_and_grads(chunked, q, k, v), loss_and_grads(dense, q, k, v)
    np.testing.assert_allclose(la, lb, rtol=1e-4)  # a sum over every output: float32 round-off
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_block_sizes_are_fitted_to_divide_the_length_when_they_can():
    assert fit_chunk(3136, 512) == fit_chunk(12544, 512) == 448  # 224px at patch 4 and 2
    assert fit_chunk(50176, 512) == 512 and fit_chunk(300, 512) == 300
    assert fit_chunk(36, 8) == 6 and fit_chunk(24, 5) == 4
    assert fit_chunk(37, 8) == 8  # a prime length pads: 5 blocks of 8
    assert fit_chunk(577, 512) == 296  # class token + 24 x 24: 2 blocks, 15 padded rows


def test_accelerators_take_larger_blocks_within_the_score_block_budget():
    assert flash.default_chunk(3, backend="cpu") == flash.CPU_CHUNK == 512
    # The largest power of two c in [512, 4096] with B * H * c^2 <= 2^26.
    assert flash.default_chunk(3, backend="gpu") == 4096  # the benchmark: batch 1, 3 heads
    assert flash.default_chunk(4, backend="gpu") == 4096  # 4 * 4096^2 = 2^26 exactly
    assert flash.default_chunk(5, backend="gpu") == 2048
    assert flash.default_chunk(16, backend="tpu") == 2048  # 16 * 2048^2 = 2^26
    assert flash.default_chunk(17, backend="gpu") == 1024
    assert flash.default_chunk(8 * 12, backend="gpu") == 512  # ViT-B at batch 8: the floor


def test_chunk_budget_counts_one_devices_share_of_batch_and_heads():
    q = jnp.zeros((16, 8, 4, 2))
    assert attn.per_device_batch_heads(q) == 64  # no mesh: everything on one device
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.mesh_rules(mesh, sharding.DEFAULT_RULES):
        assert attn.per_device_batch_heads(q) == (16 // 4) * (4 // 2)
        # A batch the data axes do not divide stays whole (fit_spec_to_shape drops them).
        assert attn.per_device_batch_heads(jnp.zeros((3, 8, 4, 2))) == 3 * 2


def test_chunked_backend_bfloat16_close_to_float32():
    q, k, v = qkv(lq=64, lk=64)
    ref = attn.attention(q, k, v, attn.CausalMask(), backend="dense")
    low = attn.attention(
        *(x.astype(jnp.bfloat16) for x in (q, k, v)), attn.CausalMask(), backend="chunked"
    )
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), ref, atol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_chunked_low_precision_gradients_match_dense_float32(dtype):
    """The backward multiplies in the inputs' dtype with float32 accumulation; the reference is
    dense float32 attention on the same rounded inputs, including fully masked rows."""
    q, k, v = (x.astype(dtype) for x in qkv(lq=36, lk=23))
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    mask = attn.CausalMask()

    def low(q, k, v):
        return chunked_attention(q, k, v, mask, q_chunk=16, k_chunk=5).astype(jnp.float32)

    dense = lambda q, k, v: attn.attention(q, k, v, mask, backend="dense")  # noqa: E731
    (_, ga), (_, gb) = loss_and_grads(low, q, k, v), loss_and_grads(dense, q32, k32, v32)
    for a, b in zip(ga, gb, strict=True):
        assert a.dtype == dtype and bool(jnp.all(jnp.isfinite(a)))
        err = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert err < (2e-2 if dtype == jnp.bfloat16 else 3e-3), err


def _temp_bytes(fn, length):
    q = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
    return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_and_dense_quadratically():
    chunked = lambda q, k, v: chunked_attention(q, k, v, attn.FullMask(), q_chunk=256, k_chunk=256)  # noqa: E731
    dense = lambda q, k, v: attn.attention(q, k, v, backend="dense")  # noqa: E731
    c1, c4 = _temp_bytes(chunked, 1024), _temp_bytes(chunked, 4096)
    d1, d4 = _temp_bytes(dense, 1024), _temp_bytes(dense, 4096)
    assert c4 / c1 < 5.0, (c1, c4)  # linear (4x) with fixed-size block buffers
    assert d4 / d1 > 8.0, (d1, d4)  # the [L, L] score matrix (16x asymptotically)
    assert c4 < d4 / 8


@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal"])
def test_sequence_parallel_matches_dense_on_the_mesh(mask):
    mesh = sharding.make_mesh({"data": 2, "sequence": 4})
    q, k, v = qkv(b=2, lq=32, lk=32, h=2)
    dense = lambda q, k, v: attn.attention(q, k, v, mask, backend="dense")  # noqa: E731

    def sequence_parallel(q, k, v):
        with sharding.mesh_rules(mesh, sharding.DEFAULT_RULES):
            return attn.attention(q, k, v, mask, backend="sequence_parallel")

    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "sequence"))
    q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
    got = jax.jit(sequence_parallel)(q, k, v)
    np.testing.assert_allclose(got, dense(q, k, v), rtol=1e-5, atol=1e-5)
    (la, ga), (lb, gb) = (
        jax.jit(lambda *a: loss_and_grads(sequence_parallel, *a))(q, k, v),
        loss_and_grads(dense, q, k, v),
    )
    np.testing.assert_allclose(la, lb, rtol=1e-4)  # a sum over every output: float32 round-off
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sequence_parallel_rejects_indivisible_lengths():
    mesh = sharding.make_mesh({"data": 2, "sequence": 4})
    q, k, v = qkv(lq=30, lk=30)
    with (
        sharding.mesh_rules(mesh, sharding.DEFAULT_RULES),
        pytest.raises(ValueError, match="divisible"),
    ):
        attn.attention(q, k, v, backend="sequence_parallel")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal"])
def test_cudnn_matches_dense(mask):
    """cuDNN takes bfloat16 only: the reference is dense attention in float32 on the same
    bfloat16-rounded inputs, so the tolerance covers cuDNN's bfloat16 arithmetic alone."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(lq=64, lk=64, d=64))
    as_f32 = lambda fn: lambda q, k, v: fn(q, k, v).astype(jnp.float32)  # noqa: E731
    cudnn = as_f32(lambda q, k, v: attn.attention(q, k, v, mask, backend="cudnn"))
    dense = lambda q, k, v: attn.attention(q, k, v, mask, backend="dense")  # noqa: E731
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    np.testing.assert_allclose(cudnn(q, k, v), dense(q32, k32, v32), atol=2e-2)
    (la, ga), (lb, gb) = loss_and_grads(cudnn, q, k, v), loss_and_grads(dense, q32, k32, v32)
    np.testing.assert_allclose(la, lb, rtol=2e-2)
    for a, b in zip(ga, gb, strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=2e-2 * scale)


def test_cudnn_on_cpu_is_a_clear_error():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="needs a GPU"):
        attn.attention(q, k, v, backend="cudnn")


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="splash attention needs a TPU")
@pytest.mark.parametrize("mask", MASKS, ids=["full", "causal"])
def test_splash_matches_dense(mask):
    q, k, v = qkv(lq=256, lk=256, d=64)
    ref = attn.attention(q, k, v, mask, backend="dense")
    np.testing.assert_allclose(attn.attention(q, k, v, mask, backend="splash"), ref, atol=2e-2)


def _hand_built(name: str) -> np.ndarray:
    """12 x 12 reference masks, written out without the mask classes."""
    if name == "full":
        return np.ones((12, 12), bool)
    if name == "causal":
        return np.tril(np.ones((12, 12), bool))
    allowed = np.zeros((12, 12), bool)  # 5 patches, then 7 registers
    allowed[:5, :5] = True
    for i in range(7):
        allowed[5 + i, : 5 + i + 1] = True
    return allowed


@pytest.mark.parametrize(
    "name,mask",
    [
        ("full", attn.FullMask()),
        ("causal", attn.CausalMask()),
        ("register", attn.RegisterCausalMask(5)),
    ],
)
def test_splash_masks_say_what_ours_say(name, mask):
    """The conversion to Pallas splash masks runs anywhere; the kernel itself only on a TPU."""
    converted = attn.splash_mask(mask, 12, 12, num_heads=2)
    for head in range(2):
        np.testing.assert_array_equal(np.asarray(converted[head, :, :]), _hand_built(name))


def test_splash_off_tpu_is_a_clear_error():
    if jax.default_backend() == "tpu":
        pytest.skip("a TPU is present")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="needs a TPU"):
        attn.attention(q, k, v, backend="splash")
