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


@pytest.mark.parametrize(
    "options",
    [{}, {"token_mixing": True, "decoder_patches": "overlap_out"}],
    ids=["plain", "mixing"],
)
def test_halted_tokens_have_no_effect_on_the_decoded_image(options):
    model = small_karl(**options)
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
    np.testing.assert_array_equal(np.asarray(ids)[:, :4][kept], np.asarray(out["ids"])[:, :4][kept])
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
    assert (
        float(
            jnp.abs(
                model.encode(images, index)["halt_logits"][:, :5] - full["halt_logits"][:, :5]
            ).max()
        )
        > 1e-3
    )


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


# --- training ------------------------------------------------------------------------------------


def test_halting_loss_on_hand_computed_numbers():
    from vitok.tasks.karl import halting_loss

    # Budget 2 of 4: keep labels for [0, 0] (log 2 each), halt labels for [2, -2]:
    # log(1 + e^-2) = 0.12693 and log(1 + e^2) = 2.12693, mean 1.12693; sum 1.82008.
    loss = halting_loss(jnp.asarray([[0.0, 0.0, 2.0, -2.0]]), jnp.asarray([2]))
    assert float(loss) == pytest.approx(np.log(2) + 1.126928, abs=1e-5)
    # Each group is averaged over the batch by itself: 1 kept and 3 halted tokens, then 4 kept.
    two = halting_loss(jnp.asarray([[3.0, 1.0, 1.0, 1.0], [0.0] * 4]), jnp.asarray([1, 4]))
    keep = (np.log1p(np.exp(3.0)) + 4 * np.log(2)) / 5
    halt = np.log1p(np.exp(-1.0))
    assert float(two) == pytest.approx(keep + halt, abs=1e-5)
    # No token past any budget: only the keep term.
    assert float(halting_loss(jnp.zeros((1, 3)), jnp.asarray([3]))) == pytest.approx(np.log(2))


def test_bin_augmentation_only_tightens_full_budgets_and_loosens_minimal_ones():
    from vitok.tasks.karl import augment_bins

    bins = jnp.full((4000,), 6)
    budget = jnp.asarray([8, 2, 5, 8] * 1000)  # t_max 8, t_min 2, 5 in between
    out = np.asarray(augment_bins(jax.random.key(0), bins, budget, 8, 2, 19, 1.0))
    full, minimal, middle = out[np.asarray(budget) == 8], out[1::4], out[2::4]
    assert set(full) == set(range(7))  # uniform over 0..6
    assert abs(np.mean(full) - 3.0) < 0.15
    assert set(minimal) == set(range(6, 19))  # uniform over 6..18
    np.testing.assert_array_equal(middle, 6)
    none = augment_bins(jax.random.key(0), bins, budget, 8, 2, 19, 0.0)
    np.testing.assert_array_equal(none, 6)


def test_two_phase_loss_equals_its_terms_computed_by_hand():
    """A deterministic case (one budget, one phase-1 bin, no augmentation): the task's loss is
    phase 1's reconstruction + keep BCE and phase 2's reconstruction + halting BCE (at the bin of
    the error phase 1 achieved, through the predicted halting) + both quantizer losses."""
    from helpers import small_karl_config

    from vitok.tasks.karl import KARLTask

    deterministic = {"karl.budgets": (2,), "karl.phase1_bins": 1, "karl.bin_augment": 0.0}
    config = small_karl_config(**deterministic)
    task = KARLTask(config)
    model = small_karl(image_size=(16, 16), max_tokens=4)
    images = jax.random.uniform(jax.random.key(5), (3, 16, 16, 3), minval=-1, maxval=1)
    loss, metrics = task.loss(model, {"image": images}, jax.random.key(6))

    def softplus(x):
        return np.log1p(np.exp(x))

    target = np.asarray(model.to_space(images))
    enc1 = model.encode(images, jnp.zeros(3, jnp.int32), 2)
    recon1 = np.asarray(model.decode_space(enc1["codes"], jnp.arange(4)[None] < 2))
    l1 = np.abs(np.clip((np.asarray(model.from_space(recon1)) + 1) / 2, 0, 1)
                - np.clip((np.asarray(images) + 1) / 2, 0, 1)).mean(axis=(1, 2, 3))  # fmt: skip
    bins2 = np.searchsorted(np.asarray(QUALITY_BINS), l1, side="left")
    enc2 = model.encode(images, jnp.asarray(np.minimum(bins2, 18)))
    logits2 = np.asarray(enc2["halt_logits"])
    keep2 = 1 / (1 + np.exp(-logits2)) <= 0.75
    recon2 = np.asarray(model.decode_space(enc2["codes"], jnp.asarray(keep2)))
    terms = {
        "train/recon_phase1": np.mean((recon1 - target) ** 2),
        "train/keep_bce": softplus(np.asarray(enc1["halt_logits"])[:, :2]).mean(),
        "train/halt_bce": softplus(logits2[:, :2]).mean() + softplus(-logits2[:, 2:]).mean(),
        "train/recon_phase2": np.mean((recon2 - target) ** 2),
        "train/quantizer": float(enc1["quantizer_loss"] + enc2["quantizer_loss"]),
        "train/l1_phase1": l1.mean(),
        "train/tokens_phase2": keep2.sum(-1).mean(),
    }
    for name, value in terms.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    losses = [v for k, v in terms.items() if k not in ("train/l1_phase1", "train/tokens_phase2")]
    assert float(loss) == pytest.approx(sum(losses), rel=1e-5)
    # The phase-1 VQ loss counts only the 2 tokens within the budget.
    z = jax.random.normal(jax.random.key(7), (3, 4, 4))
    _, _, within_loss = model.vq(z, jnp.broadcast_to(jnp.arange(4) < 2, (3, 4)))
    _, _, first_two = model.vq(z[:, :2])
    assert float(within_loss) == pytest.approx(float(first_two), rel=1e-5)


@pytest.mark.slow  # trains or compiles long
def test_training_lowers_both_phases_losses_and_learns_to_halt():
    from helpers import small_karl_config

    from vitok import sharding, train

    # One phase-1 budget (2 of 4 tokens): the halting it teaches is learnable in a few steps.
    config = small_karl_config(
        **{"optim.lr": 3e-3, "mesh.data": 1, "karl.budgets": (2,), "total_steps": 30}
    )
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    setup = train.Setup.create(config, mesh, config.sharding.rules)
    state = jax.jit(setup.init_state)(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (16, 16, 16, 3), minval=-1, maxval=1)
    images = jnp.round(images * 2) / 2  # a few flat levels: learnable in a few steps
    step = jax.jit(setup.train_step)
    first = None
    for _ in range(30):
        state, metrics = step(state, {"image": images})
        first = first or {k: float(v) for k, v in metrics.items()}
    last = {k: float(v) for k, v in metrics.items()}
    for key in ("train/recon_phase1", "train/recon_phase2", "train/halt_bce"):
        assert last[key] < 0.8 * first[key], (key, first[key], last[key])
    assert last["train/tokens_phase2"] == 2  # halts exactly the tokens past the budget


@pytest.mark.slow
def test_train_on_eight_devices_matches_one(tmp_path):
    from helpers import losses, small_karl_config

    from vitok import train

    one = small_karl_config(**{"mesh.data": 1})
    with one.unlocked():
        one.evals = {}
    train.train_and_evaluate(one, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = small_karl_config(**{"mesh.data": 4, "mesh.fsdp": 2})
    with eight.unlocked():
        eight.evals = {"adaptive": eight.evals.adaptive}
        eight.evals.adaptive.grid_rows = 0
    final = train.train_and_evaluate(eight, str(tmp_path / "eight"))
    np.testing.assert_allclose(
        losses(str(tmp_path / "eight")), losses(str(tmp_path / "one")), rtol=2e-5, atol=2e-5
    )
    workdir = tmp_path / "eight"
    table = (workdir / "adaptive.md").read_text()
    assert f"{final['adaptive/tokens@0.05']:.1f}" in table
    assert 0 <= final["adaptive/over@0.2"] <= final["adaptive/over@0.05"] <= 1
    assert 0 < final["adaptive/tokens@0.2"] <= 4


@pytest.mark.slow
def test_command_line_tools_serve_karl_with_quality_and_budget(tmp_path):
    from helpers import small_karl_config
    from PIL import Image

    from vitok import train
    from vitok.data import sources
    from vitok.inference import Tokenizer
    from vitok.tools import detokenize, extract_codes, tokenize

    workdir = str(tmp_path / "run")
    config = small_karl_config(**{"total_steps": 2})
    with config.unlocked():
        config.evals.recon.baseline_examples = 64
        config.evals = {"recon": config.evals.recon}
    final = train.train_and_evaluate(config, workdir)
    # The fixed-budget report: KARL at each budget beside the linear code at the same bits.
    for k in (1, 2, 4):
        assert 0 < final[f"eval/psnr@{k}"] < 60 and 0 < final[f"eval/baseline_psnr@{k}"] < 60
    assert "| 4 |" in open(f"{workdir}/reconstructions.md").read()
    photos = sources.PhotoCropsSource(split="test", crop_size=16, num_examples=3)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(photos[i]["image"]).save(folder / f"img{i}.png")
    out = str(tmp_path / "tokens.npz")
    tokenize.main(["--workdir", workdir, "--images", str(folder), "--out", out, "--quality",
                   "0.2", "--budget", "3"])  # fmt: skip
    with np.load(out) as data:
        tokens = data["tokens"]
    tokenizer = Tokenizer.from_workdir(workdir)
    images = np.stack([photos[i]["image"] for i in range(3)])
    np.testing.assert_array_equal(tokens, tokenizer.tokenize(images, quality=0.2, budget=3))
    assert tokens.shape == (3, 4) and (tokens[:, 3] == PAD_ID).all()
    recon = str(tmp_path / "recon")
    detokenize.main(["--workdir", workdir, "--tokens", out, "--out", recon])
    expected = tokenizer.detokenize(tokens)
    np.testing.assert_array_equal(np.asarray(Image.open(f"{recon}/img1_k4.png")), expected[1])
    with pytest.raises(SystemExit, match=r"quality is a mean L1 error in \[0, 1\], got 1.5"):
        tokenize.main(["--workdir", workdir, "--images", str(folder), "--out", out,
                       "--quality", "1.5"])  # fmt: skip
    with pytest.raises(SystemExit, match="budget must be in 1..4, got 9"):
        tokenize.main(["--workdir", workdir, "--images", str(folder), "--out", out,
                       "--budget", "9"])  # fmt: skip
    codes = str(tmp_path / "codes_{split}.npz")
    extract_codes.main(["--workdir", workdir, "--out", codes, "--splits", "test", "--quality",
                        "0.2"])  # fmt: skip
    with np.load(codes.format(split="test")) as data:
        assert data["codes"].shape == (16, 4) and int(data["codebook_size"]) == 32


def test_karl_small_preset_is_the_papers_model_on_a_frozen_vae():
    """configs/karl.py:karl_small: 1024 wide, 8 + 8 layers of 8 heads, 256 2D tokens from the
    frozen f8c16 VAE's 32x32 latents in 2x2 patches, 256 1D tokens, VQ 4096 x 12, the 19 bins,
    threshold 0.75, budgets 16..368, lr 1e-4 x 512 / 256 (the facts sheet)."""
    from configs import karl, vae
    from vitok.models import ModelHandle

    config = karl.get_config("karl_small")
    model = ModelHandle.abstract(config.model).module()
    assert (model.enc_width, model.dec_width) == (1024, 1024)
    assert (model.encoder.depth, model.decoder.depth) == (8, 8)
    assert config.model.encoder.num_heads == config.model.decoder.num_heads == 8
    assert model.num_patches == 256 and model.max_tokens == 256
    assert (model.codebook_size, model.code_dim) == (4096, 12) and model.quantizer_kind == "vq"
    assert model.quality_bins == QUALITY_BINS and model.halt_threshold == 0.75
    assert tuple(config.karl.budgets) == tuple(range(16, 384, 16))
    assert config.optim.lr == pytest.approx(1e-4 * 512 / 256) and config.batch_size == 512
    assert model.pretrained_workdirs() == {"base": ""}  # set to the VAE run's workdir
    base = vae.get_config("imagenet256_f8c16").model
    for key in ("latent_channels", "width", "mults", "blocks"):
        assert tuple(np.atleast_1d(config.model.base[key])) == tuple(np.atleast_1d(base[key]))
    assert model.decoder_patch == 16  # one 2D token per 16 x 16 pixels, as the paper's
    assert karl.get_config("karl_small_continuous").model.quantizer == "continuous"


@pytest.mark.slow  # trains or compiles long
def test_a_frozen_vae_is_the_base_space_and_receives_no_gradient():
    """model.base = a KL autoencoder: the 2D tokens are patches of its latents, the decoder
    regresses latents and ``decode`` goes back to pixels through it; training's gradient
    reaches KARL's weights but not the frozen VAE's (they are not parameters)."""
    from helpers import small_karl_config, small_vae_config

    from vitok.models import ModelHandle, init_variables
    from vitok.models.vit import patchify
    from vitok.tasks.karl import KARLTask

    config = small_karl_config()
    with config.unlocked():
        config.model.base = dict(small_vae_config().model) | {"checkpoint": ""}
        config.model.patch_size = 2  # over the 8x8x4 latents of 16x16 images: 16 2D tokens
    handle = ModelHandle.abstract(config.model)
    params, extra = init_variables(config.model, jax.random.key(0))
    model = handle.merge(params, extra)
    assert model.num_patches == 16 and model.patch_dim == 2 * 2 * 4 and model.decoder_patch == 4
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)

    @jax.jit  # one compile instead of op-by-op dispatch of the VAE and both KARL passes
    def forward(params, extra, images):
        model = handle.merge(params, extra)
        return model.base.encode(images), model.to_space(images), model.reconstruct(images, 0.05)

    latents, space, (recon, tokens) = forward(params, extra, images)
    np.testing.assert_allclose(space, patchify(latents, 2), atol=1e-6)
    assert recon.shape == (2, 16, 16, 3) and tokens.shape == (2,)
    assert jax.tree.leaves(extra), "the VAE's weights live in extra (frozen)"

    task = KARLTask(config)

    def loss(p):
        return task.loss(handle.merge(p, extra), {"image": images}, jax.random.key(2))[0]

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0
