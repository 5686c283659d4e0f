"""What a model family provides: the ``Model`` contract and the ``Tokenizer`` interface.

Every registered model is a ``Model``; ``ModelHandle.abstract`` checks it when a run starts
(``check_model``), so a family that forgets ``forward_flops`` fails with its name instead of
silently reporting no MFU.

A ``Tokenizer`` maps images to integer ids and back. Two layouts exist:

* a grid of codes (the FSQ autoencoders): ``token_shape = (h, w)``, ``ordered = False``;
* an ordered 1D sequence (FlexTok, KARL): ``token_shape = (N,)``, ``ordered = True``. The
  tokens run coarse to fine and any first k of them decode. Per image, positions past its
  length hold ``PAD_ID`` (-1): the ragged form of adaptive tokenizers, and the way every
  caller asks for "the first k tokens" without a new array shape per k.

``vitok.inference.Tokenizer`` wraps any of them for host numpy use; the tools, the
reconstruction and generation evaluators and code extraction use only this interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_ID = -1


class ModelContractError(TypeError):
    """A registered model does not provide what the trainer needs of every family."""


class Model(nnx.Module):
    """Base class of every model family.

    Required: ``forward_flops()``. Optional (defaults here): ``pretrained_workdirs()`` for
    frozen sub-models the trainer loads at the start of a run, ``adapt_pretrained`` for
    ``init_from`` weights of another shape, ``data_init`` for a start fitted to training data.
    """

    def forward_flops(self) -> float:
        """Matmul FLOPs of one training forward pass for one example (for ``perf/mfu``)."""
        raise NotImplementedError

    def pretrained_workdirs(self) -> dict[str, str]:
        """{attribute: workdir of a training run} of frozen sub-models to load (none)."""
        return {}

    # A data-dependent start: when a run starts (no checkpoint to resume), the trainer reads the
    # first ``data_init_examples`` training images (the run's preprocessing) and sets the
    # variables ``data_init(images)`` returns, {path: value}, params or fixed ``extra`` ones
    # alike (none by default; both hooks are needed); an ``init_from`` source's values then
    # replace those it has.
    data_init_examples = 0

    def data_init(self, images: np.ndarray) -> dict[tuple[str, ...], np.ndarray]:
        return {}

    def adapt_pretrained(self, path: tuple[str, ...], value: jax.Array, source: Any) -> Any:
        """``value`` (a param of ``source``, another model of the family) reshaped for this
        model's param at ``path``; None when the family cannot adapt it (the default)."""
        return None


def check_model(model: Any, name: str) -> None:
    """Raises ``ModelContractError`` naming what ``model`` (registered as ``name``) lacks."""
    if not isinstance(model, Model):
        raise ModelContractError(
            f"model {name!r} builds a {type(model).__name__}, which is not a "
            f"vitok.models.base.Model"
        )
    if type(model).forward_flops is Model.forward_flops:
        raise ModelContractError(
            f"model {name!r} ({type(model).__name__}) does not define forward_flops(), "
            f"which the trainer needs for perf/mfu"
        )
    if isinstance(model, Tokenizer):
        missing = [
            m
            for m in ("tokenize", "detokenize")
            if getattr(type(model), m) is getattr(Tokenizer, m)
        ]
        if missing:
            raise ModelContractError(f"tokenizer {name!r} does not define {missing}")


class Tokenizer(Model):
    """Images in [-1, 1] <-> int32 ids. Subclasses set, as attributes or properties:

    * ``image_size`` (H, W) and ``channels`` C of the images it takes (``image_shape``);
    * ``token_shape``: (N,) for an ordered 1D sequence, (h, w) for a grid of codes;
    * ``codebook_size``: ids lie in [0, codebook_size) (and PAD_ID past a length);
    * ``ordered``: True for coarse-to-fine 1D tokens, any first k of which decode;
    * ``decoder_patch``: pixel size of the patches the decoder writes (seam statistics);
    * ``tokenize_options`` / ``decode_options``: {name: default} of the keyword options
      ``tokenize`` / ``detokenize`` accept (e.g. a sampler's steps);
    * ``mean_decode_options``: options that make ``detokenize`` a deterministic mean
      (MMSE-style) decode, when its default decode samples; None otherwise.
    """

    image_size: tuple[int, int]
    channels: int
    token_shape: tuple[int, ...]
    codebook_size: int
    ordered: bool = False
    contiguous_ids: bool = True  # ordered ids: PAD_ID only as a suffix (KARL: at halted tokens)
    decoder_patch: int = 1
    tokenize_options: Mapping[str, Any] = {}
    decode_options: Mapping[str, Any] = {}
    mean_decode_options: Mapping[str, Any] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    def tokenize(self, images: jax.Array, **options) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids int32 [B, *token_shape]."""
        raise NotImplementedError

    def tokenize_at_budget(self, images: jax.Array, k: jax.Array | int) -> jax.Array:
        """Ordered tokenizers: ids [B, N] for a reconstruction from at most k tokens (k may be
        traced). A nested tokenizer (FlexTok) keeps the first k of its ids; one whose encoder
        takes the budget (KARL) overrides this."""
        return prefix_ids(self.tokenize(images), k)

    def reconstruct_at_budget(
        self, images: jax.Array, k: jax.Array | int, rng: jax.Array | None = None, **options
    ) -> jax.Array:
        """images [B, H, W, C] -> their reconstructions from at most k tokens (``options``: the
        decode options). A tokenizer with continuous tokens overrides this."""
        return self.detokenize(self.tokenize_at_budget(images, k), rng, **options)

    def detokenize(self, ids: jax.Array, rng: jax.Array | None = None, **options) -> jax.Array:
        """ids int32 [B, *token_shape] (ordered: [B, k], k <= N, PAD_ID past each image's
        length) -> images [B, H, W, C], about [-1, 1]."""
        raise NotImplementedError

    def check_images(self, images: Any) -> None:
        check_image_shape(images, self.image_shape, type(self).__name__)

    def check_ids(self, ids: np.ndarray) -> None:
        """Host check of ids for ``detokenize``: a clear ValueError for a bad shape or value."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if self.ordered:
            (n,) = self.token_shape
            if ids.ndim != 2 or not 1 <= ids.shape[1] <= n:
                raise ValueError(
                    f"token ids must have shape [B, k] with 1 <= k <= {n}, got {ids.shape}"
                )
            real = ids != PAD_ID
            if self.contiguous_ids and ids.size and (~real[:, 0]).any():
                raise ValueError("every image needs at least one token (the first id is -1)")
            if self.contiguous_ids and (real[:, 1:] & ~real[:, :-1]).any():
                raise ValueError("padding (-1) may only follow an image's tokens, not precede them")
            values = ids[real]
        else:
            if tuple(ids.shape[1:]) != tuple(self.token_shape) or ids.ndim != 1 + len(
                self.token_shape
            ):
                raise ValueError(
                    f"token ids must have shape [B, {', '.join(map(str, self.token_shape))}], "
                    f"got {ids.shape}"
                )
            values = ids
        if values.size and (values.min() < 0 or values.max() >= self.codebook_size):
            raise ValueError(
                f"token ids must lie in [0, {self.codebook_size}), got values in "
                f"[{values.min()}, {values.max()}]"
            )


class GridTokenizer(Tokenizer):
    """A tokenizer whose ids are a grid [B, h, w]: one code per ``decoder_patch`` x
    ``decoder_patch`` pixels (the FSQ autoencoders)."""

    ordered = False

    @property
    def grid(self) -> tuple[int, int]:
        """The code grid (h, w) of one image."""
        p = self.decoder_patch
        return (self.image_size[0] // p, self.image_size[1] // p)

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.grid


def checked_options(given: Mapping[str, Any], known: Mapping[str, Any], what: str) -> dict:
    """``known`` (name -> default) updated with ``given``; an unknown name is a ValueError
    naming ``what`` and the known names."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{what} takes the options {sorted(known)}; unknown: {unknown}")
    return {**known, **given}


def check_image_shape(images: Any, shape: tuple[int, ...], who: str) -> None:
    """images must be [B, *shape]; else a ValueError naming ``who`` and both shapes."""
    if images.ndim != 1 + len(shape) or tuple(images.shape[1:]) != tuple(shape):
        dims = ", ".join(map(str, shape))
        raise ValueError(f"{who} expects images of shape [B, {dims}], got {tuple(images.shape)}")


def prefix_ids(ids: jax.Array, k: jax.Array | int) -> jax.Array:
    """ids [B, N] -> the same with positions >= k set to PAD_ID (k: scalar or [B])."""
    k = jnp.asarray(k)
    k = k[:, None] if k.ndim else k
    return jnp.where(jnp.arange(ids.shape[1])[None] < k, ids, PAD_ID)


def pad_ids(ids: jax.Array, length: int) -> jax.Array:
    """ids [B, k] (k <= length) -> [B, length], padded with PAD_ID."""
    return jnp.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=PAD_ID)


def id_lengths(ids: Any) -> Any:
    """Ordered ids [B, N] -> the number of real tokens per image [B] (numpy or jax)."""
    return (ids != PAD_ID).sum(-1)
