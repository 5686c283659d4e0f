"""KARL's model: the VQ against numpy, the halting targets and masks against hand-built ones,
halted tokens without effect on the decoder, and token counts through the tokenizer interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitok.models.base import PAD_ID
from vitok.models.karl import (
    KARL,
    QUALITY_BINS,
    decoder_keep,
    halting_targets,
    quality_bin,
)
from vitok.nn.attention import TokenKeepMask
from vitok.nn.quantizers import VectorQuantizer


def small_karl(**kw) -> KARL:
    block = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    args = dict(
        image_size=(8, 8), patch_size=4, max_tokens=6, encoder=block, decoder=block,
        codebook_size=16, code_dim=4, halt_hidden=16,
    )  # fmt: skip
    return KARL(**(args | kw), rngs=nnx.Rngs(0))


def test_vq_picks_the_nearest_normalised_code_like_numpy():
    vq = VectorQuantizer(32, 5, rngs=nnx.Rngs(1))
    z = jax.random.normal(jax.random.key(2), (3, 7, 5))
    codes, ids, loss = vq(z)
    codebook = np.asarray(vq.codebook[...], np.float64)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    zn = np.asarray(z, np.float64)
    zn /= np.linalg.norm(zn, axis=-1, keepdims=True)
    distances = ((zn[..., None, :] - codebook) ** 2).sum(-1)  # [3, 7, 32]
    np.testing.assert_array_equal(ids, distances.argmin(-1))
    np.testing.assert_allclose(codes, codebook[distances.argmin(-1)], atol=1e-6)
    np.testing.assert_allclose(vq.ids_to_codes(ids), codes, atol=1e-6)
    expected = 1.25 * np.mean((codebook[distances.argmin(-1)] - zn) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Straight-through: the gradient reaches z.
    grad = jax.grad(lambda z: vq(z)[0].sum())(z)
    assert float(jnp.abs(grad).sum()) > 0


def test_quality_bins_are_the_smallest_bin_at_or_above_the_request():
    requests = jnp.asarray([0.0, 0.005, 0.0051, 0.05, 0.08, 0.38, 0.9])
    expected = [0, 0, 1, 5, 8, 18, 18]  # 0.05 is bin 5; 0.08 -> 0.09 (bin 8); above 0.38 -> last
    np.testing.assert_array_equal(quality_bin(requests, QUALITY_BINS), expected)
    assert QUALITY_BINS[5] == 0.05 and QUALITY_BINS[8] == 0.09


def test_halting_targets_and_masks_match_hand_built_ones():
    np.testing.assert_array_equal(
        halting_targets(jnp.asarray([2, 4]), 4, 2), [[0, 0, 1, 1], [0, 0, 0, 0]]
    )
    keep = decoder_keep(jnp.asarray([[True, False, True]]), num_patches=2)
    np.testing.assert_array_equal(keep, [[1, 1, 1, 0, 1]])
    allowed = np.asarray(TokenKeepMask(keep).dense(5, 5))[0]
    hand = np.ones((5, 5), bool)
    hand[3, :] = hand[:, 3] = False  # the halted token sees nothing, nothing sees it ...
    hand[3, 3] = True  # ... except itself
    np.testing.assert_array_equal(allowed, hand)
    # Per example, never mixed across the batch (the official code's head/batch bug).
    two = TokenKeepMask(jnp.asarray([[1, 1, 0], [1, 0, 1]], bool)).dense(3, 3)
    assert not two[0, 0, 2] and two[1, 0, 2] and two[0, 0, 1] and not two[1, 0, 1]


def test_halted_tokens_have_no_effect_on_the_decoded_image():
    model = small_karl()
    codes = jax.random.normal(jax.random.key(0), (2, 6, 4))
    keep = jnp.asarray([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    changed = jnp.where(
        keep[..., None], codes, 100 * jax.random.normal(jax.random.key(1), codes.shape)
    )
    out, out_changed = model.decode(codes, keep), model.decode(changed, keep)
    np.testing.assert_allclose(out, out_changed, atol=1e-5)
    # ... while a kept token does change it.
    assert float(jnp.abs(model.decode(codes.at[0, 0].add(1.0), keep) - out).max()) > 1e-4


def test_tokenize_returns_one_id_per_unhalted_token_within_the_budget():
    model = small_karl()
    images = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3), minval=-1, maxval=1)
    ids = model.tokenize(images, quality=0.05, budget=4)
    assert ids.shape == (4, 6) and ids.dtype == jnp.int32
    out = model.encode(images, quality_bin(jnp.full((4,), 0.05), QUALITY_BINS), 4)
    unhalted = (jax.nn.sigmoid(out["halt_logits"][:, :4]) <= 0.75).sum(-1)
    np.testing.assert_array_equal((ids != PAD_ID).sum(-1), unhalted)
    np.testing.assert_array_equal(ids[:, 4:], PAD_ID)
    kept = np.asarray(ids != PAD_ID)[:, :4]
    np.testing.assert_array_equal(
        np.asarray(ids)[:, :4][kept], np.asarray(out["ids"])[:, :4][kept]
    )
    assert model.detokenize(ids).shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="budget must be in 1..6"):
        model.tokenize(images, budget=7)


def test_a_budget_is_the_same_as_an_encoder_over_only_the_first_t_latent_tokens():
    """Positions past the budget are excluded from attention: whatever their learned tokens
    hold, the first T outputs do not change, and a budget per image gives each image's own."""
    model = small_karl()
    images = jax.random.uniform(jax.random.key(4), (2, 8, 8, 3), minval=-1, maxval=1)
    index = jnp.asarray([3, 7])
    out = model.encode(images, index, jnp.asarray([2, 5]))
    table = model.latent_tokens[...]
    model.latent_tokens[...] = table.at[5:].set(50.0)
    changed = model.encode(images, index, jnp.asarray([2, 5]))
    assert float(jnp.abs(changed["halt_logits"][1, :5] - out["halt_logits"][1, :5]).max()) < 1e-5
    model.latent_tokens[...] = table.at[2:].set(50.0)
    changed = model.encode(images, index, jnp.asarray([2, 5]))
    np.testing.assert_allclose(changed["halt_logits"][0, :2], out["halt_logits"][0, :2], atol=1e-5)
    np.testing.assert_array_equal(changed["ids"][0, :2], out["ids"][0, :2])
    np.testing.assert_array_equal(out["within"], [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    # ... and without a budget every latent token is attended to.
    model.latent_tokens[...] = table
    full = model.encode(images, index)
    model.latent_tokens[...] = table.at[5:].set(50.0)
    assert float(jnp.abs(model.encode(images, index)["halt_logits"][:, :5] - full["halt_logits"][:, :5]).max()) > 1e-3


def test_the_tokenizer_interface_serves_karl_with_checked_options():
    import ml_collections

    from vitok import runs
    from vitok.inference import Tokenizer
    from vitok.models import ModelHandle, init_variables

    block = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    model = {
        "name": "karl", "image_size": (8, 8), "patch_size": 4, "max_tokens": 6,
        "encoder": block, "decoder": block, "codebook_size": 16, "code_dim": 4, "halt_hidden": 16,
    }  # fmt: skip
    config = ml_collections.ConfigDict({"model": model, "seed": 0})
    params, extra = init_variables(config.model, jax.random.key(0))
    run = runs.Run("", config, ModelHandle.abstract(config.model), params, extra, 0, "params")
    tokenizer = Tokenizer(run)
    assert tokenizer.ordered and tokenizer.num_tokens == 6 and tokenizer.codebook_size == 16
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ids = tokenizer.tokenize(images, quality=0.03, budget=5)
    direct = run.module().tokenize(
        jnp.asarray(images, jnp.float32) / 127.5 - 1, quality=0.03, budget=5
    )
    np.testing.assert_array_equal(ids, direct)
    np.testing.assert_array_equal(tokenizer.lengths(ids), (np.asarray(direct) != PAD_ID).sum(-1))
    assert tokenizer.detokenize(ids).shape == (3, 8, 8, 3)
    with pytest.raises(ValueError, match=r"quality is a mean L1 error in \[0, 1\], got 1.5"):
        tokenizer.tokenize(images, quality=1.5)
    with pytest.raises(ValueError, match="budget must be in 1..6, got 9"):
        tokenizer.tokenize(images, budget=9)
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        tokenizer.detokenize(np.full((1, 6), 16))
