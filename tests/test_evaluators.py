"""PSNR, SSIM, FID and the linear-code baseline against independent implementations and closed forms."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.metrics

from vitok.evaluators.fid import FeatureNet, FeatureStats, fid_from_stats, frechet_distance
from vitok.evaluators.linear_code import fit_linear_code, fit_spread_linear_code
from vitok.evaluators.reconstruction import (
    neighbour_statistics,
    psnr,
    ssim,
    token_counts,
)
from vitok.plots import metric_panels


def _pairs(seed=0, shape=(3, 24, 20, 3)):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape).astype(np.float32)
    b = np.clip(a + rng.normal(scale=0.1, size=shape), 0, 1).astype(np.float32)
    return a, b


def test_psnr_matches_scikit_image():
    a, b = _pairs()
    ours = np.asarray(psnr(jnp.asarray(a), jnp.asarray(b)))
    for i in range(len(a)):
        expected = skimage.metrics.peak_signal_noise_ratio(a[i], b[i], data_range=1.0)
        assert ours[i] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_scikit_image_gaussian_ssim(channels):
    a, b = _pairs(1, (2, 32, 27, channels))
    ours = np.asarray(ssim(jnp.asarray(a), jnp.asarray(b)))
    for i in range(len(a)):
        expected = skimage.metrics.structural_similarity(
            a[i],
            b[i],
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ours[i] == pytest.approx(expected, abs=1e-4)
    assert float(ssim(jnp.asarray(a), jnp.asarray(a))[0]) == pytest.approx(1.0, abs=1e-5)


def test_token_counts():
    assert token_counts("pow2", 32) == [1, 2, 4, 8, 16, 32]
    assert token_counts("pow2", 6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match=r"1\.\.4"):
        token_counts([1, 5], 4)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)


def test_frechet_distance_matches_pytorch_fids_sqrtm_formula_for_full_rank_deficient_covs():
    """Covariances of fewer samples than dimensions (rank-deficient, as small evaluations
    have): the eigendecomposition route equals Tr sqrtm(S1 S2) as pytorch-fid computes it."""
    import scipy.linalg

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 64)), rng.gamma(1.0, 1.0, (25, 64))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_fid_of_full_covariances_matches_an_eigendecomposition():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    y = rng.normal(size=(400, 4)) @ rng.normal(size=(4, 4)) + 0.5
    sx, sy = FeatureStats(), FeatureStats()
    for chunk in np.array_split(x, 3):
        sx.add(chunk)
    sy.add(y)
    mu_x, cov_x = sx.mean_cov()
    np.testing.assert_allclose(cov_x, np.cov(x, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(mu_x, x.mean(0), rtol=1e-10)
    # Tr((Sx Sy)^1/2) = Tr((Sx^1/2 Sy Sx^1/2)^1/2), computed with symmetric eigendecompositions.
    cov_y = np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(cov_x)
    root_x = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root_x @ cov_y @ root_x)
    expected = (
        np.sum((mu_x - y.mean(0)) ** 2)
        + np.trace(cov_x)
        + np.trace(cov_y)
        - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    )
    assert fid_from_stats(sx, sy) == pytest.approx(expected, rel=1e-6)
    assert fid_from_stats(sx, sx) == pytest.approx(0.0, abs=1e-6)


def test_feature_net_from_a_model_config_resizes_and_rejects_missing_config():
    model = ml_collections.ConfigDict(
        {
            "name": "vit",
            "image_size": (28, 28),
            "channels": 1,
            "patch_size": 7,
            "width": 32,
            "depth": 1,
            "mlp_dim": 64,
            "num_heads": 2,
            "num_classes": 0,
            "pool": "gap",
        }
    )
    net = FeatureNet(ml_collections.ConfigDict({"model": model, "seed": 0}))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(4, 32, 32, 3)), jnp.float32)
    features = net(images)
    assert features.shape == (4, 32) and bool(jnp.isfinite(features).all())
    # Same images -> same features; different images -> different features.
    np.testing.assert_allclose(net(images), features)
    assert float(jnp.abs(net(images[::-1]) - features).max()) > 1e-3
    with pytest.raises(ValueError, match="'workdir'"):
        FeatureNet(ml_collections.ConfigDict({}))


def _correlated_images(n, seed=0, shape=(6, 5, 3)):
    """Images with a decaying spectrum (a random linear mix of decaying-variance sources)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    mix = np.linalg.qr(rng.normal(size=(d, d)))[0]
    sources = rng.normal(size=(n, d)) * (0.7 ** np.arange(d))
    return (sources @ mix.T + 0.3).reshape(n, *shape).astype(np.float32)


def test_linear_code_matches_an_svd_pca_with_hand_quantization():
    """The fit (eigh of the covariance) against PCA by SVD of the centred data, and the
    quantization against a direct nearest-level search over the training range."""
    train, held_out = _correlated_images(500), _correlated_images(40, seed=1)
    code = fit_linear_code(train, num_components=6, levels=7)
    x = train.reshape(len(train), -1).astype(np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    for i in range(6):  # the same subspace, one direction at a time (up to sign)
        assert abs(float(code.components[i] @ vt[i])) == pytest.approx(1.0, abs=1e-6)
    coeffs = (x - mean) @ vt[:6].T
    y = held_out.reshape(len(held_out), -1).astype(np.float64) - mean
    for k in (1, 3, 6):
        signs = np.sign(code.components[:k] @ vt[:k].T).diagonal()
        expected = np.zeros_like(y)
        for i in range(k):
            c = (y @ vt[i]) * signs[i]
            lo, hi = (coeffs[:, i] * signs[i]).min(), (coeffs[:, i] * signs[i]).max()
            grid = np.linspace(lo, hi, 7)
            nearest = grid[np.abs(c[:, None] - grid[None]).argmin(axis=1)]
            expected += nearest[:, None] * vt[i][None] * signs[i]
        ours = code.reconstruct(held_out, k).reshape(len(held_out), -1)
        np.testing.assert_allclose(ours, expected + mean, atol=1e-5)


def test_spread_linear_code_puts_each_tokens_bits_on_d_coefficients():
    """fit_spread_linear_code against a hand computation: k tokens of FSQ levels (4, 3) are
    2k PCA coefficients (SVD), coefficient i on levels[i % 2] values over +-1.5 std, found by a
    direct nearest-level search."""
    train, held_out = _correlated_images(500), _correlated_images(40, seed=1)
    code = fit_spread_linear_code(train, num_tokens=3, levels=(4, 3))
    x = train.reshape(len(train), -1).astype(np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    y = held_out.reshape(len(held_out), -1).astype(np.float64) - mean
    for k in (1, 3):
        expected = np.zeros_like(y)
        for i in range(2 * k):
            spread = 1.5 * ((x - mean) @ vt[i]).std()
            grid = np.linspace(-spread, spread, (4, 3)[i % 2])
            c = y @ vt[i]  # the sign of a direction flips its grid too: nothing changes
            expected += grid[np.abs(c[:, None] - grid[None]).argmin(axis=1)][:, None] * vt[i]
        ours = code.reconstruct(held_out, k).reshape(len(held_out), -1)
        np.testing.assert_allclose(ours, expected + mean, atol=1e-5)
    with pytest.raises(ValueError, match="1..3 tokens"):
        code.reconstruct(held_out, 4)


def test_training_images_read_the_runs_own_training_split():
    from vitok.data.pipeline import training_images
    from vitok.data.sources import PhotoCropsSource

    data = ml_collections.ConfigDict(
        {"source": "photo_crops", "split": "train_extended", "crop_size": 16, "photos": "",
         "pp": "decode(channels=3)|value_range(0, 1)"}
    )  # fmt: skip
    images = training_images(data, 11)
    crops = PhotoCropsSource(split="train_extended", crop_size=16)
    assert images.shape == (11, 16, 16, 3)
    # The eleventh crop is of grace_hopper.jpg, which only the extended split has.
    np.testing.assert_allclose(images[10], crops[10]["image"] / 255.0, atol=1e-6)
    # A run's start-up asks twice (data_init, the linear codes): one read, shared read-only.
    assert training_images(data, 11) is images and not images.flags.writeable
    data.crop_size = 8
    assert training_images(data, 11).shape == (11, 8, 8, 3)


def test_linear_code_without_quantization_loses_the_discarded_variance():
    """A known property: unquantized PCA with k components leaves the sum of the discarded
    eigenvalues as its mean squared error on the training data; with every component, none."""
    train = _correlated_images(400)
    d = int(np.prod(train.shape[1:]))
    code = fit_linear_code(train, num_components=d, levels=2**20)
    x = train.reshape(len(train), -1).astype(np.float64)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    for k in (2, 10):
        err = np.sum((code.reconstruct(train, k).reshape(len(x), -1) - x) ** 2, axis=1).mean()
        assert err == pytest.approx(eigenvalues[k:].sum(), rel=1e-3)
    np.testing.assert_allclose(code.reconstruct(train, d), train, atol=1e-4)
    with pytest.raises(ValueError, match="1..90 tokens"):
        code.reconstruct(train, d + 1)


def test_seam_ratio_is_one_on_a_ramp_and_large_on_a_patch_mosaic():
    ramp = np.broadcast_to(np.linspace(0, 1, 16)[None, :, None, None], (1, 16, 16, 3))
    ramp = ramp + np.linspace(0, 0.5, 16)[None, None, :, None]
    border, inside, detail = np.asarray(neighbour_statistics(jnp.asarray(ramp), 4))[0]
    assert border == pytest.approx(inside, rel=1e-5)
    # Hand count: dx is 0.5/15 everywhere, dy 1/15 everywhere; the mean is their mean.
    assert detail == pytest.approx((0.5 / 15 + 1 / 15) / 2, rel=1e-5)
    rng = np.random.default_rng(0)
    blocks = rng.uniform(size=(1, 4, 4, 3))
    mosaic = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)  # constant 4x4 patches
    mosaic = mosaic + 0.01 * rng.uniform(size=mosaic.shape)
    border, inside, _ = np.asarray(neighbour_statistics(jnp.asarray(mosaic), 4))[0]
    assert border / inside > 10
    # A grid of 2 px patches puts half its borders inside the mosaic's flat patches.
    border2, inside2, _ = np.asarray(neighbour_statistics(jnp.asarray(mosaic), 2))[0]
    assert 1.5 < border2 / inside2 < border / inside
    with pytest.raises(ValueError, match="no inside and border"):
        neighbour_statistics(jnp.asarray(mosaic), 16)  # no patch border inside 16 px


def test_metric_panels_group_families_with_a_line_per_k_and_references_dotted():
    rows = [
        {"step": s, "train/loss": 1.0 / s, "eval/psnr@1": 10.0 + s, "eval/psnr@4": 12.0 + s,
         "eval/mean_psnr@1": 11.0, "eval/baseline_psnr@1": 14.0, "eval/baseline_psnr@4": 16.0,
         "eval/seam_ratio@1": 2.0, "eval/seam_ratio_original": 1.0, "eval/accuracy": 0.5}
        for s in (100, 200)
    ]  # fmt: skip
    panels = metric_panels(rows)
    assert list(panels)[0] == "train/loss"
    assert set(panels) == {
        "train/loss", "eval/psnr", "eval/mean_psnr", "eval/seam_ratio", "eval/accuracy"
    }  # fmt: skip
    assert panels["eval/psnr"]["k=4"] == ([100, 200], [112.0, 212.0], "-")
    assert panels["eval/psnr"]["k=4 linear"] == ([100, 200], [16.0, 16.0], ":")
    assert panels["eval/mean_psnr"]["k=1 linear"][2] == ":"
    assert panels["eval/seam_ratio"]["originals"] == ([100, 200], [1.0, 1.0], ":")
