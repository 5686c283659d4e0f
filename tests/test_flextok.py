"""FlexTok: register mask, FSQ, nested dropout, the flow loss and sampler, training, sharding."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_flextok_config

from vitok import sharding, train
from vitok.data import sources
from vitok.models import build_model
from vitok.models.flextok import (
    FlexTok,
    apg_velocity,
    dct_basis,
    keep_count_choices,
    keep_mask,
    shift_sigma,
)
from vitok.models.vit import overlap_patchify, overlap_unpatchify
from vitok.nn.attention import RegisterCausalMask, attention
from vitok.nn.quantizers import FSQ
from vitok.tasks.flextok import (
    flow_loss,
    loss_weight,
    noise_images,
    sample_keep_counts,
    sample_sigma,
)


def test_register_mask_matches_hand_built_reference():
    patches, registers = 5, 4
    length = patches + registers
    reference = np.zeros((length, length), bool)
    for q in range(length):
        for k in range(length):
            if q < patches:  # patch tokens see patch tokens only
                reference[q, k] = k < patches
            else:  # register i sees every patch and registers 0..i
                reference[q, k] = k < patches or k <= q
    np.testing.assert_array_equal(RegisterCausalMask(patches).dense(length, length), reference)


@pytest.mark.parametrize("backend", ["chunked"])
def test_register_mask_backends_match_dense(backend):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 2, 8)), jnp.float32) for _ in range(3))
    mask = RegisterCausalMask(29)
    expected = attention(q, k, v, mask, backend="dense")
    np.testing.assert_allclose(attention(q, k, v, mask, backend=backend), expected, atol=1e-5)


def test_fsq_ids_are_a_bijection_onto_the_codebook():
    fsq = FSQ((3, 4, 2))
    assert fsq.codebook_size == 24
    digits = jnp.asarray(list(itertools.product(range(3), range(4), range(2))), jnp.float32)
    ids = np.asarray(fsq.digits_to_ids(digits))
    assert sorted(ids.tolist()) == list(range(24))
    # ids -> codes -> (pre-image through tanh) -> quantize gives the same ids back.
    codes = fsq.ids_to_codes(jnp.arange(24))
    assert float(jnp.abs(codes).max()) == 1.0
    u = (codes + 1) / 2  # in [0, 1]
    z = jnp.arctanh(jnp.clip(2 * u - 1, -0.999, 0.999))
    requantized_codes, requantized_ids = fsq(z)
    np.testing.assert_array_equal(np.asarray(requantized_ids), np.arange(24))
    np.testing.assert_allclose(requantized_codes, codes, atol=1e-6)


def test_fsq_codes_take_exactly_levels_values_and_pass_gradients_straight_through():
    fsq = FSQ((8, 5))
    z = jnp.asarray(np.random.default_rng(0).normal(scale=3, size=(4000, 2)), jnp.float32)
    codes, _ = fsq(z)
    assert len(np.unique(np.asarray(codes[:, 0]))) == 8
    assert len(np.unique(np.asarray(codes[:, 1]))) == 5
    grad = jax.grad(lambda z: fsq(z)[0].sum())(z[:3])
    levels = np.asarray([8, 5], np.float32)
    expected = (1 - np.tanh(np.asarray(z[:3])) ** 2) / 2 * (levels - 1) / (levels - 1) * 2
    np.testing.assert_allclose(grad, expected, rtol=1e-5)


def _model(**overrides) -> FlexTok:
    config = small_flextok_config(**overrides)
    return build_model(config.model, nnx.Rngs(0))


def _photos(n: int, size: int = 16) -> jax.Array:
    source = sources.PhotoCropsSource(split="train", crop_size=size, num_examples=n)
    images = np.stack([source[i]["image"] for i in range(n)]).astype(np.float32)
    return jnp.asarray(images / 127.5 - 1)


def _randomize(model: nnx.Module, seed: int = 1) -> None:
    """Gives the zero-initialised layers (AdaLN, output) random values, so every input matters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))


@pytest.mark.slow
@pytest.mark.parametrize("register_mixing", [False, True])
def test_register_i_depends_only_on_registers_up_to_i(register_mixing):
    model = _model(**{"model.register_mixing": register_mixing})
    _randomize(model)
    images = _photos(2)
    fsq_inputs = nnx.jit(lambda m, x: m.to_fsq(m.encoder(*m.encoder_inputs(x))))
    z_before = fsq_inputs(model, images)
    bump = jax.random.normal(jax.random.key(3), (model.enc_width,))
    model.enc_registers[...] = model.enc_registers[...].at[2].add(bump)
    z_after = fsq_inputs(model, images)
    p = model.num_patches
    np.testing.assert_allclose(z_after[:, : p + 2], z_before[:, : p + 2], atol=1e-6)
    assert float(jnp.abs(z_after[:, p + 2] - z_before[:, p + 2]).max()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("register_mixing", [False, True])
def test_nested_dropout_keeps_exactly_k_registers(register_mixing):
    model = _model(**{"model.register_mixing": register_mixing})
    _randomize(model)
    images = _photos(3)
    codes, _ = model.encode(images)
    counts = jnp.asarray([1, 2, 4])
    keep = keep_mask(counts, model.num_registers)
    np.testing.assert_array_equal(keep.sum(1), counts)
    registers = model.condition(codes, keep)
    masked = model.mask_token[...][0] + model.dec_register_posemb[...]
    for b, k in enumerate([1, 2, 4]):
        np.testing.assert_allclose(registers[b, k:], masked[k:], atol=1e-6)
        assert float(jnp.abs(registers[b, :k] - masked[:k]).min()) > 0
    # The decoder sees nothing of the dropped codes: changing them changes no velocity.
    x_t, sigma = jnp.ones((3, model.num_patches, model.patch_dim)), jnp.full((3,), 0.5)
    other = codes.at[:, 1:].set(-codes[:, 1:])

    def velocity(codes, k):
        keep = keep_mask(counts * 0 + k, 4)
        return model.velocity(
            x_t, sigma, model.condition(codes, keep), model.linear_estimate(codes, keep)
        )

    v1, v2 = velocity(codes, 1), velocity(other, 1)
    np.testing.assert_allclose(v1, v2, atol=1e-6)
    v3 = velocity(other, 2)
    assert float(jnp.abs(v3 - v1).max()) > 1e-4


def test_keep_counts_sample_the_configured_choices():
    np.testing.assert_array_equal(keep_count_choices(32, "pow2"), [1, 2, 4, 8, 16, 32])
    np.testing.assert_array_equal(keep_count_choices(5, "pow2"), [1, 2, 4, 5])
    np.testing.assert_array_equal(keep_count_choices(4, "uniform"), [1, 2, 3, 4])
    counts = np.asarray(sample_keep_counts(jax.random.key(0), 20_000, [1, 2, 4, 8], 0.1))
    assert set(np.unique(counts)) == {0, 1, 2, 4, 8}
    assert abs((counts == 0).mean() - 0.1) < 0.01
    assert abs((counts == 8).mean() - 0.225) < 0.015


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    rng = np.random.default_rng(0)
    x0, noise = (rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(2))
    sigma = jnp.asarray([0.2, 0.9])
    x_t = noise_images(x0, noise, sigma)
    np.testing.assert_allclose(x_t[1], 0.9 * noise[1] + 0.1 * x0[1], rtol=1e-6)
    assert float(flow_loss(noise - x0, noise - x0)) == 0.0
    assert float(flow_loss(noise - x0 + 0.1, noise - x0)) == pytest.approx(0.01, rel=1e-5)


def test_dct_basis_is_orthonormal_and_ordered_coarse_to_fine():
    basis = dct_basis((4, 6), 30)
    np.testing.assert_allclose(basis[:24] @ basis[:24].T, np.eye(24), atol=1e-5)
    assert not basis[24:].any()  # only 24 basis functions exist on a 4x6 grid
    np.testing.assert_allclose(basis[0], np.full(24, 24**-0.5), rtol=1e-5)  # the mean first
    # Against scipy's orthonormal 2D DCT: projecting an image onto row r gives coefficient (u, v).
    from scipy.fft import dctn

    image = np.random.default_rng(0).normal(size=(4, 6))
    coefficients = dctn(image, norm="ortho")
    projections = basis[:24] @ image.reshape(-1)
    np.testing.assert_allclose(np.sort(projections), np.sort(coefficients.reshape(-1)), atol=1e-5)
    assert projections[1] == pytest.approx(coefficients[0, 1], abs=1e-5)  # then (0,1), (1,0)
    assert projections[2] == pytest.approx(coefficients[1, 0], abs=1e-5)


@pytest.mark.slow
def test_repa_alignment_reads_the_decoder_at_its_layer_in_the_same_pass():
    """REPA's projected hidden tokens come from block ``repa_layer``: changing a later block
    changes the velocity but not them; the velocity equals the plain ``velocity``."""
    config = small_flextok_config(**{"model.decoder.depth": 2})
    kwargs = {k: v for k, v in dict(config.model).items() if k not in ("name", "vae")}
    kwargs |= {"repa_layer": 1, "repa_dim": 8, "scan_layers": False}
    model = FlexTok.from_config(kwargs, rngs=nnx.Rngs(0))
    out = model.dec_out.kernel  # zero at initialisation: the velocity would ignore the decoder
    out[...] = 0.1 * jax.random.normal(jax.random.key(3), out.shape)
    images = _photos(2)
    codes, _ = model.encode(images)
    keep = keep_mask(jnp.asarray([2, 4]), 4)
    registers, linear = model.condition(codes, keep), model.linear_estimate(codes, keep)
    x0 = model.to_space(images)
    x_t = noise_images(x0, jax.random.normal(jax.random.key(1), x0.shape), jnp.asarray([0.4, 0.7]))
    sigma = jnp.asarray([0.4, 0.7])
    v, aligned = model.velocity_and_alignment(x_t, sigma, registers, linear)
    assert aligned.shape == (2, model.num_patches, 8)
    v_plain = model.velocity(x_t, sigma, registers, linear)
    np.testing.assert_allclose(v, v_plain, rtol=1e-6, atol=1e-6)
    last = model.decoder.blocks[1]  # every weight, its adaLN-zero gates included
    nnx.update(last, jax.tree.map(lambda p: p + 0.1, nnx.state(last, nnx.Param)))
    v2, aligned2 = model.velocity_and_alignment(x_t, sigma, registers, linear)
    np.testing.assert_array_equal(aligned2, aligned)
    assert float(jnp.abs(v2 - v).max()) > 1e-3
    first = model.decoder.blocks[0]  # and block 1 is what it reads
    nnx.update(first, jax.tree.map(lambda p: p + 0.1, nnx.state(first, nnx.Param)))
    _, aligned3 = model.velocity_and_alignment(x_t, sigma, registers, linear)
    assert float(jnp.abs(aligned3 - aligned).max()) > 1e-3
    with pytest.raises(ValueError, match="repa_dim > 0"):
        FlexTok.from_config(kwargs | {"repa_dim": 0}, rngs=nnx.Rngs(0)).velocity_and_alignment(
            x_t, sigma, registers, linear
        )


def test_x0_prediction_turns_the_same_network_output_into_a_velocity():
    """With identical weights, the x0-model's velocity is (x_t - raw) / sigma where raw is what
    the velocity-model outputs; its training target is noise - x0 above the sigma floor."""
    config = small_flextok_config()
    kwargs = {k: v for k, v in dict(config.model).items() if k not in ("name", "vae")}
    kwargs.pop("prediction", None)
    kwargs["linear_route"] = False  # it needs x0 prediction (checked below)
    as_velocity = FlexTok.from_config(kwargs | {"prediction": "velocity"}, rngs=nnx.Rngs(0))
    as_x0 = FlexTok.from_config(kwargs | {"prediction": "x0"}, rngs=nnx.Rngs(0))
    out = as_velocity.dec_out
    out.kernel[...] = 0.1 * jax.random.normal(jax.random.key(1), out.kernel.shape)
    as_x0.dec_out.kernel[...] = out.kernel[...]
    images = _photos(2)
    codes, _ = as_velocity.encode(images)
    registers = as_velocity.condition(codes, keep_mask(jnp.asarray([1, 4]), 4))
    x0 = as_velocity.to_space(images)
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    sigma = jnp.asarray([0.3, 0.8])
    x_t = noise_images(x0, noise, sigma)
    raw = as_velocity.velocity(x_t, sigma, registers)
    v = as_x0.velocity(x_t, sigma, registers)
    np.testing.assert_allclose(v, (x_t - raw) / sigma[:, None, None], rtol=1e-4, atol=1e-5)
    target = as_x0.velocity_target(x_t, x0, noise, sigma)
    np.testing.assert_allclose(target, noise - x0, rtol=1e-4, atol=1e-5)
    # Weighted by sigma^2, the velocity loss is the plain MSE of the clean estimate.
    x0_loss = flow_loss(v, target, loss_weight(sigma, "x0"))
    np.testing.assert_allclose(x0_loss, jnp.mean(jnp.square(raw - x0)), rtol=1e-4)
    with pytest.raises(ValueError, match="loss_space"):
        loss_weight(sigma, "eps")
    with pytest.raises(ValueError, match="prediction"):
        FlexTok.from_config(kwargs | {"prediction": "eps"}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="linear_route adds to the clean estimate"):
        FlexTok.from_config(kwargs | {"linear_route": True}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mixing_init must be 'normal' or 'dct'"):
        FlexTok.from_config(kwargs | {"mixing_init": "pca"}, rngs=nnx.Rngs(0))


class _PointMassFlow(FlexTok):
    """Replaces the network by the exact velocity field of a single data point x*."""

    target = None

    def velocity(self, x_t, sigma, registers, linear=None):
        target = jnp.tile(self.target, (x_t.shape[0] // self.target.shape[0], 1, 1))
        return (x_t - target) / sigma[:, None, None]


@pytest.mark.parametrize("time_shift", [1.0, 3.0])
def test_euler_sampler_with_the_exact_velocity_reaches_the_data(time_shift):
    config = small_flextok_config(**{"model.time_shift": time_shift})
    model = _PointMassFlow.from_config(config.model, rngs=nnx.Rngs(0))
    images = _photos(2)
    model.target = model.to_space(images)
    codes, _ = model.encode(images)
    keep = keep_mask(jnp.asarray([4, 4]), 4)
    out = model.sample(codes, keep, jax.random.key(0), steps=3)
    np.testing.assert_allclose(out, images, atol=1e-5)
    # Guidance mixes two identical predictions here, so it changes nothing either.
    guided = model.sample(codes, keep, jax.random.key(0), steps=3, guidance=3.0)
    np.testing.assert_allclose(guided, images, atol=1e-5)


def test_time_shift_maps_the_unit_interval_onto_itself_upwards():
    sigma = jnp.linspace(0, 1, 11)
    shifted = shift_sigma(sigma, 3.0)
    assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0
    assert bool(jnp.all(jnp.diff(shifted) > 0)) and bool(jnp.all(shifted[1:-1] > sigma[1:-1]))
    np.testing.assert_allclose(shift_sigma(sigma, 1.0), sigma)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_training_noise_levels_mix_the_shifted_logit_normal_with_uniform(fraction):
    from scipy.stats import norm

    sigma = np.asarray(sample_sigma(jax.random.key(0), 50_000, 4.0, fraction))
    assert sigma.min() >= 0.0 and sigma.max() <= 1.0
    for level in (0.1, 0.3, 0.5, 0.9):
        # P(sigma < s) under the shifted logit-normal: invert the shift, then the sigmoid.
        u = level / (4.0 - 3.0 * level)
        logit_normal = norm.cdf(np.log(u / (1 - u)))
        expected = fraction * level + (1 - fraction) * logit_normal
        assert abs((sigma < level).mean() - expected) < 0.006, level
    if fraction == 0.0:  # the published draw, unchanged
        draw = shift_sigma(jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (50_000,))), 4.0)
        np.testing.assert_array_equal(sigma, np.asarray(draw))


def test_apg_without_projection_or_clipping_is_plain_guidance():
    rng = np.random.default_rng(0)
    x, vc, vn = (jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32) for _ in range(3))
    sigma, w = 0.7, 4.0
    apg = apg_velocity(x, sigma, vc, vn, w, eta=1.0, norm_threshold=1e9)
    np.testing.assert_allclose(apg, vn + w * (vc - vn), rtol=1e-4, atol=1e-4)
    # eta = 0 drops the component parallel to the conditional estimate.
    apg0 = apg_velocity(x, sigma, vc, vn, w, eta=0.0, norm_threshold=1e9)
    x0_c, x0_guided = x - sigma * vc, x - sigma * apg0
    update = (x0_guided - x0_c).reshape(2, -1)
    assert np.allclose(np.sum(update * np.asarray(x0_c).reshape(2, -1), axis=1), 0, atol=1e-3)


def test_detokenize_works_for_every_k_and_rejects_bad_input():
    model = _model()
    _randomize(model)
    images = _photos(2)
    ids = model.tokenize(images)
    assert ids.dtype == jnp.int32 and ids.shape == (2, 4)
    assert int(ids.min()) >= 0 and int(ids.max()) < 15
    outputs = []
    for k in range(1, 5):
        out = model.detokenize(ids[:, :k], jax.random.key(0), steps=2)
        assert out.shape == images.shape and bool(jnp.isfinite(out).all())
        outputs.append(out)
    for a, b in itertools.pairwise(outputs):
        assert float(jnp.abs(a - b).max()) > 1e-4  # every extra token changes the image
    with pytest.raises(ValueError, match="1 to 4 tokens, got k=5"):
        model.detokenize(jnp.zeros((2, 5), jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="1 to 4 tokens, got k=0"):
        model.detokenize(jnp.zeros((2, 0), jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match=r"shape \[B, 16, 16, 3\]"):
        model.tokenize(jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"lie in \[0, 15\)"):
        model.check_ids(np.asarray([[3, 15]]))


@pytest.mark.slow
def test_a_few_steps_on_a_handful_of_images_reduce_the_loss():
    config = small_flextok_config(**{"optim.lr": 3e-3, "mesh.data": 1, "total_steps": 40})
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = train.Setup.create(config, mesh, config.sharding.rules)
    state = jax.jit(setup.init_state)(jax.random.key(0))
    batch = {"image": _photos(8)}
    step = jax.jit(setup.train_step)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses


@pytest.mark.slow
def test_train_on_eight_devices_matches_one_and_writes_the_reconstruction_report(tmp_path):
    one = small_flextok_config(**{"mesh.data": 1})
    with one.unlocked():
        one.evals = {}  # the losses are compared; the report is checked on the 8-device run
    train.train_and_evaluate(one, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = small_flextok_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    final = train.train_and_evaluate(eight, str(tmp_path / "eight"))
    from helpers import losses

    np.testing.assert_allclose(
        losses(str(tmp_path / "eight")), losses(str(tmp_path / "one")), rtol=2e-5, atol=2e-5
    )
    for k in (1, 2, 4):
        assert 0 < final[f"eval/psnr@{k}"] < 60 and -1 <= final[f"eval/ssim@{k}"] <= 1
    assert "eval/psnr@3" not in final
    workdir = tmp_path / "eight"
    table = (workdir / "reconstructions.md").read_text()
    assert "| 4 |" in table and f"{final['eval/psnr@4']:.2f}" in table
    from PIL import Image

    with Image.open(workdir / "reconstructions.png") as grid:
        # 2 rows x (3 token counts + the original) tiles of 16 px with 2 px borders.
        assert grid.size == (4 * 18 + 2, 2 * 18 + 2)
    assert os.path.exists(workdir / "curves.png")


def _windows(images: np.ndarray, p: int) -> np.ndarray:
    """images [B, H, W, C] -> the 2p x 2p window centred on each p x p patch, [B, P, 4 p^2 C],
    cut from the image edge-padded by p/2 (a hand-written reference for the tile layout)."""
    b, h, w, c = images.shape
    o = p // 2
    padded = np.pad(images, ((0, 0), (o, p - o), (o, p - o), (0, 0)), mode="edge")
    tiles = [
        padded[:, i * p : i * p + 2 * p, j * p : j * p + 2 * p].reshape(b, -1)
        for i in range(h // p)
        for j in range(w // p)
    ]
    return np.stack(tiles, axis=1)


@pytest.mark.parametrize("p", [2, 4])
def test_overlap_unpatchify_blends_tiles_into_the_image_they_agree_on(p):
    """Tiles that all agree with one image blend back to it exactly (the tent weights are a
    partition of unity, the border included); disagreeing tiles meet in a blend, not a seam."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 4 * p, 3 * p, 3)).astype(np.float32)
    tiles = jnp.asarray(_windows(images, p))
    np.testing.assert_allclose(overlap_patchify(jnp.asarray(images), p), tiles)
    np.testing.assert_allclose(overlap_unpatchify(tiles, (4, 3), p), images, atol=1e-6)
    # Two constant tiles side by side: the pixels between their centres ramp from one to the
    # other (a tent blend), instead of jumping at the patch border.
    flat = np.zeros((1, 2, 4 * p * p * 1), np.float32)
    flat[0, 1] = 1.0
    row = np.asarray(overlap_unpatchify(jnp.asarray(flat), (1, 2), p))[0, 0, :, 0]
    ramp = row[p // 2 - 1 : p + p // 2 + 1]  # from the last pixel only tile 0 reaches
    assert row[0] == 0 and row[-1] == 1 and np.all(np.diff(ramp) > 0)
    assert np.diff(row).max() == pytest.approx(1 / p, abs=1e-6)  # a seam would jump by 1


@pytest.mark.parametrize("mode,reads", [("overlap_out", 1), ("overlap", 4)])
def test_overlap_head_model_trains_and_decodes(mode, reads):
    config = small_flextok_config(**{"model.decoder_patches": mode}).model
    model = build_model(config, nnx.Rngs(0))
    assert model.dec_out.kernel.shape[-1] == 4 * model.patch_dim
    assert model.dec_patch_embed.kernel.shape[0] == reads * model.patch_dim
    images = jnp.zeros((2, 16, 16, 3))
    codes, _ = model.encode(images)
    keep = keep_mask(jnp.array([1, 4]), model.num_registers)
    out = model.sample(codes, keep, jax.random.key(0), steps=2)
    assert out.shape == images.shape and bool(jnp.all(jnp.isfinite(out)))
    with pytest.raises(ValueError, match="decoder_patches"):
        build_model(small_flextok_config(**{"model.decoder_patches": "tiles"}).model, nnx.Rngs(0))


def test_skip_coefficients_are_the_gaussian_mmse_split():
    """c_skip x_t is the best linear estimate of Gaussian x0 from x_t and c_out the std of its
    error: checked by Monte Carlo at several noise levels."""
    from vitok.models.flextok import SIGMA_DATA, skip_coefficients

    rng = np.random.default_rng(0)
    x0 = rng.normal(scale=SIGMA_DATA, size=200_000)
    noise = rng.normal(size=x0.shape)
    sigmas = np.array([0.0, 0.2, 0.5, 0.9, 1.0], np.float32)
    skip, scale = map(np.asarray, skip_coefficients(jnp.asarray(sigmas)))
    for s, c_skip, c_out in zip(sigmas, skip, scale, strict=True):
        x_t = (1 - s) * x0 + s * noise
        best = np.dot(x_t, x0) / max(np.dot(x_t, x_t), 1e-12)
        assert c_skip == pytest.approx(best, abs=5e-3)
        assert c_out == pytest.approx(np.std(x0 - c_skip * x_t), abs=5e-3)
    assert skip[0] == pytest.approx(1.0) and scale[0] == 0 and skip[-1] == 0


def _hand_linear_code(train: np.ndarray, test: np.ndarray, levels, registers: int, k: int):
    """The linear route's start, computed by hand: PCA by SVD, FSQ's tanh digits, the codes read
    back through atanh(0.9 code), least squares by np.linalg.lstsq; ``test`` [B, D] decoded from
    its first k registers (the later ones read as 0)."""
    d = len(levels)
    n = registers * d
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    components = vt[:n].T  # [D, n]
    std = ((train - mean) @ components).std(axis=0)
    lv = np.tile(np.asarray(levels, np.float64), registers)

    def read(x):
        z = (x - mean) @ components / (1.5 * std)
        digits = np.round((np.tanh(z) + 1) / 2 * (lv - 1))
        return np.arctanh(0.9 * (digits / (lv - 1) * 2 - 1))

    design = np.concatenate([read(train), np.ones((len(train), 1))], axis=1)
    fit = np.linalg.lstsq(design, train, rcond=None)[0]
    features = read(test)
    features[:, k * d :] = 0.0
    return np.concatenate([features, np.ones((len(test), 1))], axis=1) @ fit


def test_linear_route_starts_as_the_pca_code_on_the_fsq_levels():
    """After ``data_init`` the model is the linear code (a hand computation): its one-step
    decode from the first k tokens is the PCA read-out of those k tokens' codes, and the
    transformers add nothing yet."""
    model = _model(**{"model.linear_route": True, "model.fsq_levels": (8, 5)})
    train_images = np.asarray(_photos(256))
    for (module, name), value in model.data_init(train_images).items():
        getattr(getattr(model, module), name)[...] = jnp.asarray(value)
    source = sources.PhotoCropsSource(split="test", crop_size=16, num_examples=6)
    test_images = np.stack([source[i]["image"] for i in range(6)]).astype(np.float32) / 127.5 - 1
    codes, _ = model.encode(jnp.asarray(test_images))
    flat = lambda x: np.asarray(model.to_space(jnp.asarray(x))).reshape(len(x), -1)  # noqa: E731
    for k in (1, 2, 4):
        keep = keep_mask(jnp.full((6,), k), model.num_registers)
        decoded = model.sample_space(codes, keep, jax.random.key(0), steps=1)
        expected = _hand_linear_code(
            flat(train_images).astype(np.float64), flat(test_images), (8, 5), 4, k
        )
        np.testing.assert_allclose(np.asarray(decoded).reshape(6, -1), expected, atol=2e-3)
    # Guidance against the null condition (no code kept: the route's bias, the fitted mean).
    keep = keep_mask(jnp.full((6,), 2), model.num_registers)
    guided = model.sample_space(codes, keep, jax.random.key(0), steps=1, guidance=3.0)
    cond = _hand_linear_code(flat(train_images).astype(np.float64), flat(test_images), (8, 5), 4, 2)
    null = _hand_linear_code(flat(train_images).astype(np.float64), flat(test_images), (8, 5), 4, 0)
    np.testing.assert_allclose(
        np.asarray(guided).reshape(6, -1), null + 3.0 * (cond - null), atol=6e-3
    )
    # Only the kept tokens inform the linear route: changing the others changes nothing.
    keep = keep_mask(jnp.full((6,), 2), model.num_registers)
    other = codes.at[:, 2:].set(-codes[:, 2:])
    np.testing.assert_array_equal(
        model.linear_estimate(codes, keep), model.linear_estimate(other, keep)
    )
    with pytest.raises(ValueError, match="linear_estimate"):
        model.velocity(jnp.zeros((1, 16, 48)), jnp.ones((1,)), model.condition(codes, keep)[:1])


@pytest.mark.slow
def test_the_trainer_fits_the_linear_route_and_init_from_carries_it(tmp_path):
    """A run starting from scratch holds the maps ``data_init`` fits to its first training
    images (fixed through training); a run started from it with ``init_from`` takes them from
    the source, not its own fit (here from fewer images, so the two differ)."""
    from vitok import runs
    from vitok.data import pipeline

    config = small_flextok_config(**{"mesh.data": 1, "total_steps": 2, "checkpoint_every": 2})
    with config.unlocked():
        config.evals = {}
    first = str(tmp_path / "first")
    train.train_and_evaluate(config, first, devices=jax.devices()[:1])
    run = runs.load_run(first)
    model = build_model(config.model, nnx.Rngs(0))
    fitted = model.data_init(pipeline.training_images(config.data, 64))
    for (module, name), value in fitted.items():
        np.testing.assert_allclose(np.asarray(run.extra[module][name]), value, atol=1e-5)

    second = small_flextok_config(
        **{"mesh.data": 1, "total_steps": 2, "checkpoint_every": 2, "model.linear_fit_examples": 32}
    )
    with second.unlocked():
        second.evals = {}
        second.init_from.workdir = first
    train.train_and_evaluate(second, str(tmp_path / "second"), devices=jax.devices()[:1])
    carried = runs.load_run(str(tmp_path / "second"))
    own = model.data_init(pipeline.training_images(config.data, 32))
    kernel = np.asarray(carried.extra["enc_linear"]["kernel"])
    np.testing.assert_allclose(kernel, np.asarray(run.extra["enc_linear"]["kernel"]), atol=1e-6)
    assert np.abs(kernel - own[("enc_linear", "kernel")]).max() > 1e-3
