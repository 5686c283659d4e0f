"""A linear code at a tokenizer's bit budget: the baseline every 1D tokenizer must beat.

PCA fitted on training images; an image becomes its first k principal coefficients, each
quantized uniformly to ``levels`` values between that coefficient's training minimum and maximum
(so k coefficients carry exactly the bits of k tokens of a codebook of ``levels`` entries), and is
decoded as mean + sum of the quantized coefficients times their components. With nested dropout a
linear autoencoder learns exactly this ordering, so a tokenizer that does not beat it has learned
no more than the images' low frequencies.

``fit_spread_linear_code`` spends the same bits the way an FSQ tokenizer does: d coefficients per
token, coefficient i on ``levels[i % d]`` uniform values over +-``clip_std`` training standard
deviations. A few levels on many coefficients beat many levels on few (a Gaussian source's
reverse water-filling), so this is the stronger linear reference: on FlexTok tiny's crops 1.0
to 1.6 dB above the first at every k.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LinearCode:
    """mean [D], components [K, D] (orthonormal rows, by decreasing variance), lo/hi [K]: the
    range each coefficient is quantized over, levels: quantization levels per coefficient (an
    int, or [K]), per_token: coefficients per token."""

    mean: np.ndarray
    components: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    levels: int | np.ndarray
    per_token: int = 1

    def quantize(self, coefficients: np.ndarray) -> np.ndarray:
        """[B, k] -> the nearest of ``levels`` uniform values in [lo, hi] per coefficient."""
        k = coefficients.shape[-1]
        lo, hi = self.lo[:k], self.hi[:k]
        levels = np.broadcast_to(np.asarray(self.levels), self.lo.shape)[:k]
        step = (hi - lo) / np.maximum(levels - 1, 1)
        index = np.clip(np.round((coefficients - lo) / np.maximum(step, 1e-12)), 0, levels - 1)
        return lo + index * step

    def first(self, k: int) -> LinearCode:
        """The code of the first k coefficients (what a fit with k components gives)."""
        return dataclasses.replace(
            self, components=self.components[:k], lo=self.lo[:k], hi=self.hi[:k]
        )

    def reconstruct(self, images: np.ndarray, k: int) -> np.ndarray:
        """images [B, ...] -> their reconstructions from k tokens (k * per_token quantized
        coefficients), same shape."""
        tokens = len(self.components) // self.per_token
        if not 1 <= k <= tokens:
            raise ValueError(f"the linear code has 1..{tokens} tokens, got {k}")
        x = images.reshape(len(images), -1).astype(np.float64) - self.mean
        comps = self.components[: k * self.per_token]
        q = self.quantize(x @ comps.T)
        return (self.mean + q @ comps).reshape(images.shape).astype(np.float32)


def principal_components(x: np.ndarray, num_components: int) -> tuple[np.ndarray, np.ndarray]:
    """x [M, D] -> (mean [D], components [K, D]: orthonormal rows by decreasing variance, each
    sign fixed so its largest-magnitude entry is positive: the same fit in every process)."""
    x = x.astype(np.float64)
    if num_components > min(x.shape):
        raise ValueError(
            f"a linear code of {num_components} coefficients needs at least that many training "
            f"images and dimensions, got {x.shape[0]} images of {x.shape[1]} values"
        )
    mean = x.mean(axis=0)
    centred = x - mean
    _, eigenvectors = np.linalg.eigh(centred.T @ centred / len(x))  # ascending
    components = eigenvectors[:, ::-1][:, :num_components].T
    signs = np.sign(components[np.arange(num_components), np.abs(components).argmax(axis=1)])
    return mean, components * signs[:, None]


def fit_linear_code(images: np.ndarray, num_components: int, levels: int) -> LinearCode:
    """images [M, ...] (training data) -> the PCA code with ``num_components`` coefficients."""
    x = images.reshape(len(images), -1).astype(np.float64)
    mean, components = principal_components(x, num_components)
    coefficients = (x - mean) @ components.T
    return LinearCode(
        mean=mean,
        components=components,
        lo=coefficients.min(axis=0),
        hi=coefficients.max(axis=0),
        levels=int(levels),
    )


def fit_spread_linear_code(
    images: np.ndarray, num_tokens: int, levels: tuple[int, ...], clip_std: float = 1.5
) -> LinearCode:
    """images [M, ...] -> the PCA code of ``num_tokens`` tokens of len(levels) coefficients,
    coefficient i on levels[i % d] values over mean +- clip_std std (the bits of num_tokens FSQ
    tokens with these levels)."""
    code = fit_linear_code(images, num_tokens * len(levels), 2)
    return spread_linear_code(code, images, levels, clip_std)


def spread_linear_code(
    code: LinearCode, images: np.ndarray, levels: tuple[int, ...], clip_std: float = 1.5
) -> LinearCode:
    """``fit_spread_linear_code`` from an existing fit ``code`` on the same ``images`` (its
    components, every one of them used: len(components) / len(levels) tokens)."""
    d = len(levels)
    x = images.reshape(len(images), -1).astype(np.float64) - code.mean
    spread = clip_std * (x @ code.components.T).std(axis=0)
    return LinearCode(
        mean=code.mean,
        components=code.components,
        lo=-spread,
        hi=spread,
        levels=np.tile(np.asarray(levels, np.int64), len(code.components) // d),
        per_token=d,
    )
