"""Layers and the ViT against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import copy_scanned_into_unrolled

from vitok import sharding
from vitok.models import logical_axes
from vitok.models.vit import ViT, patchify, unpatchify, vit_forward_flops
from vitok.nn import attention as attn
from vitok.nn.posemb import sincos_2d
from vitok.optim import decay_mask, make_optimizer


def numpy_attention(q, k, v, allowed):
    """Textbook softmax(q k^T / sqrt(d)) v per batch and head, in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
            scores = np.where(allowed, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[b, :, h] = weights @ v[b, :, h]
    return out


@pytest.mark.parametrize("mask", [attn.FullMask(), attn.CausalMask()])
def test_dense_attention_matches_numpy(mask):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 7, 3, 8)).astype(np.float32) for _ in range(3))
    expected = numpy_attention(q, k, v, mask.dense(7, 7))
    got = attn.attention(q, k, v, mask, backend="dense")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_causal_mask_reference():
    np.testing.assert_array_equal(attn.CausalMask().dense(3, 3), np.tril(np.ones((3, 3), bool)))
    # With a cache of 2 earlier keys, query i sees keys up to 2 + i.
    np.testing.assert_array_equal(attn.CausalMask().dense(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_unknown_backend_is_named():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="flash9"):
        attn.attention(x, x, x, backend="flash9")


def test_patchify_matches_loops_and_inverts():
    images = np.random.default_rng(0).normal(size=(2, 6, 9, 2)).astype(np.float32)
    p = 3
    patches = np.asarray(patchify(images, p))
    assert patches.shape == (2, 6, p * p * 2)
    for r in range(2):
        for c in range(3):
            np.testing.assert_array_equal(
                patches[:, r * 3 + c],
                images[:, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(2, -1),
            )
    np.testing.assert_array_equal(unpatchify(patches, (2, 3), p), images)


def test_sincos_2d_formula():
    emb = sincos_2d(3, 4, 8)
    assert emb.shape == (12, 8)
    omega = 1.0 / 10_000 ** (np.arange(2) / 2)
    row, col = 2, 3  # token index 2 * 4 + 3
    expected = np.concatenate(
        [np.sin(row * omega), np.cos(row * omega), np.sin(col * omega), np.cos(col * omega)]
    )
    np.testing.assert_allclose(emb[11], expected, rtol=1e-6)


def small_vit(**kw):
    args = dict(
        image_size=(8, 8),
        patch_size=2,
        channels=3,
        width=16,
        depth=2,
        mlp_dim=32,
        num_heads=2,
        num_classes=5,
    )
    return ViT(**(args | kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("patch_size", [8, 4, 2, 1])
def test_vit_any_patch_size(patch_size):
    model = small_vit(patch_size=patch_size)
    logits = model(jnp.ones((2, 8, 8, 3)))
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert model.grid == (8 // patch_size, 8 // patch_size)


def test_vit_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not divide"):
        small_vit(patch_size=3)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 3\].*\(2, 8, 8, 1\)"):
        small_vit()(jnp.ones((2, 8, 8, 1)))


def test_gap_pooling_is_permutation_invariant_without_posemb_effect():
    """With mean pooling, features are invariant to reordering the batch (a second path)."""
    model = small_vit(pool="gap", posemb="learn", num_classes=0)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    a = model(x)
    b = model(x[::-1])[::-1]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (3, 16)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = small_vit(dtype="bfloat16")
    x = jnp.ones((2, 8, 8, 3))
    tokens = model.tokens(x)
    assert tokens.dtype == jnp.bfloat16
    assert model.embed.kernel[...].dtype == jnp.float32
    f32 = small_vit()
    np.testing.assert_allclose(model(x), f32(x), atol=5e-2)


def test_forward_flops_match_xla_cost_analysis():
    model = small_vit(patch_size=2, depth=2)
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jnp.ones((1, 8, 8, 3))
    cost = jax.jit(forward).lower(state, x).compile().cost_analysis()
    xla_flops = cost["flops"] if isinstance(cost, dict) else cost[0]["flops"]
    analytic = model.forward_flops()
    assert analytic == vit_forward_flops(
        image_size=(8, 8), patch_size=2, channels=3, width=16, depth=2, mlp_dim=32, num_classes=5
    )
    # XLA also counts elementwise ops (softmax, GELU, norms); matmuls dominate.
    assert 0.6 * xla_flops < analytic < 1.05 * xla_flops


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_logical_rules():
    rules = sharding.DEFAULT_RULES
    P = jax.sharding.PartitionSpec
    assert sharding.logical_to_mesh_spec(("batch", "length", "embed"), rules) == P(
        ("data", "fsdp"), "sequence", None
    )  # fsdp already used by batch: embed activations stay replicated
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert sharding.fit_spec_to_shape(P("fsdp", None), (10, 3), mesh) == P(None, None)
    assert sharding.fit_spec_to_shape(P(("data", "fsdp")), (4,), mesh) == P("data")


@pytest.mark.slow
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_unrolled_layers(remat):
    scanned = small_vit(depth=3, scan_layers=True, remat=remat)
    unrolled = small_vit(depth=3)
    copy_scanned_into_unrolled(scanned, unrolled, 3)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    np.testing.assert_allclose(scanned(x), unrolled(x), rtol=1e-5, atol=1e-5)

    def loss(model):
        return model(x).sum()

    gs = nnx.grad(loss)(scanned)
    gu = nnx.grad(loss)(unrolled)
    np.testing.assert_allclose(
        nnx.to_pure_dict(gs)["encoder"]["blocks"]["mlp"]["fc1"]["kernel"][1],
        nnx.to_pure_dict(gu)["encoder"]["blocks"][1]["mlp"]["fc1"]["kernel"],
        rtol=1e-4,
        atol=1e-6,
    )


def _unrolled_copy_of(scanned_params: dict, unrolled_params: dict, depth: int) -> dict:
    """The unrolled layout of a scanned model's params (layer i of the stack -> block i)."""
    u = dict(unrolled_params)
    u["encoder"] = dict(u["encoder"])
    u["encoder"]["blocks"] = {
        i: jax.tree.map(lambda a, i=i: a[i], scanned_params["encoder"]["blocks"])
        for i in range(depth)
    }
    for key in scanned_params:
        if key != "encoder":
            u[key] = scanned_params[key]
    u["encoder"]["norm"] = scanned_params["encoder"]["norm"]
    return u


@pytest.mark.slow
def test_scanned_and_unrolled_models_train_to_the_same_losses_with_weight_decay():
    """Weight decay used to be guessed from shapes, so a scanned model's [layers, D] norm
    scales and biases were decayed and an unrolled model's were not: the same config trained
    differently. Four AdamW steps from the same weights must agree."""
    depth = 3
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    optim = {"lr": 0.05, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.5}
    histories, start = [], None
    for scan in (True, False):
        graphdef, params = nnx.split(small_vit(depth=depth, scan_layers=scan), nnx.Param)
        pure = nnx.to_pure_dict(params)
        start = pure if scan else start
        pure = pure if scan else _unrolled_copy_of(start, pure, depth)
        tx, _ = make_optimizer(optim, 10, logical_axes(params))
        state = tx.init(pure)

        def loss(p, graphdef=graphdef, params=params):
            nnx.replace_by_pure_dict(params, p)
            return jnp.mean(jnp.square(nnx.merge(graphdef, params)(x) - 1.0))

        losses = []
        for _ in range(4):
            value, grads = jax.value_and_grad(loss)(pure)
            updates, state = tx.update(grads, state, pure)
            pure = optax.apply_updates(pure, updates)
            losses.append(float(value))
        histories.append((losses, pure))
    (scanned_losses, scanned), (unrolled_losses, unrolled) = histories
    np.testing.assert_allclose(scanned_losses, unrolled_losses, rtol=1e-5)
    np.testing.assert_allclose(
        scanned["encoder"]["blocks"]["norm1"]["scale"][1],
        unrolled["encoder"]["blocks"][1]["norm1"]["scale"],
        rtol=1e-6,
    )


def test_weight_decay_follows_the_parameter_role():
    model = small_vit(depth=2, scan_layers=True)
    params = nnx.split(model, nnx.Param)[1]
    mask = decay_mask(nnx.to_pure_dict(params), logical_axes(params))
    blocks = mask["encoder"]["blocks"]
    assert blocks["mlp"]["fc1"]["kernel"] and blocks["attn"]["qkv"]  # matrices
    assert not blocks["norm1"]["scale"] and not blocks["mlp"]["fc1"]["bias"]  # [layers, D]
    assert not blocks["attn"]["qkv_bias"]  # [layers, 3, H*D], a bias by name
    assert not mask["cls"]  # [1, D]


def test_lr_multipliers_train_a_module_as_adamw_at_its_own_learning_rate():
    """``lr_multipliers`` {"encoder": 0.1}: the encoder's weights follow AdamW at a tenth of the
    schedule (weight decay included), computed here by a second optimizer on that part alone;
    the rest follow the plain optimizer; a key naming no parameter is a one-line error."""
    rng = np.random.default_rng(0)
    params = {
        "encoder": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        "decoder": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }
    axes = {"encoder": {"w": (None, None)}, "decoder": {"w": (None, None)}}
    optim = {"lr": 0.05, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.3}
    tx, _ = make_optimizer({**optim, "lr_multipliers": {"encoder": 0.1}}, 10, axes)
    slow, _ = make_optimizer({**optim, "lr": 0.005}, 10, {"w": (None, None)})
    fast, _ = make_optimizer(optim, 10, {"w": (None, None)})

    def loss(p):
        return jnp.sum(jnp.sin(p["encoder"]["w"] @ p["decoder"]["w"]))

    state = tx.init(params)
    enc, dec = params["encoder"], params["decoder"]
    enc_state, dec_state = slow.init(enc), fast.init(dec)
    for _ in range(5):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        enc_updates, enc_state = slow.update(grads["encoder"], enc_state, enc)
        dec_updates, dec_state = fast.update(grads["decoder"], dec_state, dec)
        params = optax.apply_updates(params, updates)
        enc, dec = optax.apply_updates(enc, enc_updates), optax.apply_updates(dec, dec_updates)
        enc, dec = {"w": params["encoder"]["w"]}, {"w": params["decoder"]["w"]}
        np.testing.assert_allclose(enc_updates["w"], updates["encoder"]["w"], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(dec_updates["w"], updates["decoder"]["w"], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"no parameter under 'enc'; .*\['decoder', 'encoder'\]"):
        make_optimizer({**optim, "lr_multipliers": {"enc": 0.1}}, 10, axes)
