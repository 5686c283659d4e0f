"""PSNR, SSIM and FID against independent implementations and closed forms."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.metrics

from vitok.evaluators.fid import FeatureNet, FeatureStats, fid_from_stats, frechet_distance
from vitok.evaluators.reconstruction import psnr, ssim, token_counts


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
