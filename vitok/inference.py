"""Trained tokenizers outside the trainer: load a workdir, then call them on numpy arrays.

    tok = Tokenizer.from_workdir("workdirs/flextok_tiny")  # any vitok.models.Tokenizer run
    ids = tok.tokenize(images)                  # uint8 [B, H, W, C] -> int32 [B, *token_shape]
    out = tok.detokenize(ids[:, :8], steps=25)  # -> uint8 [B, H, W, C]

FlexTok and KARL give ordered 1D ids (``tok.ordered``; -1 past an image's length, see
``vitok.models.base``), the FSQ autoencoders a grid [B, h, w]. Inputs are checked on the host,
so a wrong image size, a token count outside 1..N, a token outside the codebook or an option the
tokenizer does not take is a clear ``ValueError`` rather than a shape error deep inside jit.
Only the run's weights are read (EMA if kept), sharded over all local devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitok import runs
from vitok.models.base import Tokenizer as TokenizerModel
from vitok.models.base import checked_options, id_lengths, pad_ids


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]; float images are taken as already in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1
    return images.astype(np.float32)


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)


class Tokenizer:
    """A trained tokenizer run, on numpy arrays. Attributes: ``config``, ``step``,
    ``image_shape`` (H, W, C), ``token_shape``, ``num_tokens`` (N of an ordered tokenizer),
    ``codebook_size``, ``ordered``, ``model`` (the nnx module with its weights)."""

    def __init__(self, run: runs.Run):
        model = run.module()
        if not isinstance(model, TokenizerModel):
            raise ValueError(
                f"{run.workdir!r} holds a {run.config.model.name!r} model, which is not a "
                f"tokenizer (FlexTok, KARL or an FSQ autoencoder)"
            )
        self.run, self.config, self.step, self.model = run, run.config, run.step, model
        self.image_shape = tuple(model.image_shape)
        self.token_shape = tuple(model.token_shape)
        self.num_tokens = self.token_shape[0] if model.ordered else int(np.prod(self.token_shape))
        self.codebook_size = int(model.codebook_size)
        self.ordered = bool(model.ordered)
        handle = run.model

        def tokenize(params, extra, images, options):
            return handle.merge(params, extra).tokenize(images, **dict(options))

        def detokenize(params, extra, ids, rng, options):
            return to_uint8(handle.merge(params, extra).detokenize(ids, rng, **dict(options)))

        self._tokenize = jax.jit(tokenize, static_argnames="options")
        self._detokenize = jax.jit(detokenize, static_argnames="options")

    @classmethod
    def from_workdir(cls, workdir: str) -> Tokenizer:
        return cls(runs.load_run(workdir))

    def check_images(self, images: np.ndarray) -> None:
        self.model.check_images(np.asarray(images))

    def tokenize(self, images: np.ndarray, **options) -> np.ndarray:
        """uint8 [B, H, W, C] (or float in [-1, 1]) -> int32 [B, *token_shape] (ordered: coarse
        to fine, -1 past an image's length)."""
        options = checked_options(options, dict(self.model.tokenize_options), "tokenize")
        images = to_model_range(images)
        self.check_images(images)
        ids = self._tokenize(
            self.run.params, self.run.extra, jnp.asarray(images), tuple(sorted(options.items()))
        )
        return np.asarray(ids)

    def tokenize_padded(self, images: np.ndarray, batch_size: int, **options) -> np.ndarray:
        """``tokenize`` of up to ``batch_size`` images, zero-padded to ``batch_size`` so that a
        ragged last batch reuses the compiled shape."""
        pad = batch_size - len(images)
        padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        return self.tokenize(padded, **options)[: len(images)]

    def detokenize(self, ids: np.ndarray, *, seed: int = 0, **options) -> np.ndarray:
        """int [B, *token_shape] (ordered: [B, k], the first k tokens, 1 <= k <= N) -> uint8
        images [B, H, W, C]. ``options``: the tokenizer's ``decode_options`` (FlexTok: steps,
        guidance, ...)."""
        options = checked_options(options, dict(self.model.decode_options), "detokenize")
        if "steps" in options and int(options["steps"]) < 1:
            raise ValueError(f"steps must be >= 1, got {options['steps']}")
        ids = np.asarray(ids)
        self.model.check_ids(ids)
        ids = jnp.asarray(ids, jnp.int32)
        if self.ordered:  # one compiled shape for every k
            ids = pad_ids(ids, self.num_tokens)
        out = self._detokenize(
            self.run.params,
            self.run.extra,
            ids,
            jax.random.key(seed),
            tuple(sorted(options.items())),
        )
        return np.asarray(out)

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        """Ordered ids [B, N] -> the number of real (non -1) tokens per image [B]."""
        return np.asarray(id_lengths(np.asarray(ids)))


def load_tokenizer(workdir: str) -> Tokenizer:
    return Tokenizer.from_workdir(workdir)


def load_model(workdir: str, mesh: Any = None):
    """Any run's model with its trained weights (EMA if kept), as an nnx module."""
    return runs.load_run(workdir, mesh).module()
