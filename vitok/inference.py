"""Trained models outside the trainer: load a workdir's config and checkpoint, then call them.

    tok = FlexTokTokenizer.from_workdir("workdirs/flextok_tiny")
    ids = tok.tokenize(images)                 # uint8 [B, H, W, C] -> int32 [B, N]
    out = tok.detokenize(ids[:, :8], steps=25)  # -> uint8 [B, H, W, C]

Inputs are checked on the host, so a wrong image size, a token count outside 1..N or a token
outside the codebook is a clear ``ValueError`` rather than a shape error deep inside jit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitok import checkpoint, sharding
from vitok.train import Setup


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_params(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
) -> tuple[Setup, Any, Any, int]:
    """Restores the latest good checkpoint of ``workdir``: (setup, params, extra, step).

    Uses the EMA params when the run kept them.
    """
    rules = tuple(tuple(r) for r in config.sharding.rules)
    setup = Setup.create(config, mesh, rules)
    abstract = jax.eval_shape(setup.init_state, jax.random.key(0))
    shardings = setup.state_shardings(abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    restored = ckpt.restore(target, None)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint found in {os.path.join(workdir, 'checkpoints')}")
    state, step = restored
    return setup, state.get("ema", state["params"]), state["extra"], step


class FlexTokTokenizer:
    """A trained FlexTok: ``tokenize`` images to N ids, ``detokenize`` any first k of them."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        if config.model.name != "flextok":
            raise ValueError(f"{workdir!r} holds a {config.model.name!r} model, not 'flextok'")
        self.config = config
        self.mesh = sharding.make_mesh({"data": -1})
        self.setup, self.params, self.extra, self.step = load_params(config, workdir, self.mesh)
        self.model = self.setup.model.merge(self.params, self.extra)
        self.image_shape = (*self.model.image_size, self.model.channels)
        self.num_tokens = self.model.num_registers
        self.codebook_size = self.model.fsq.codebook_size
        handle = self.setup.model

        def tokenize(params, extra, images):
            return handle.merge(params, extra).tokenize(images)

        def detokenize(params, extra, ids, rng, steps, guidance):
            out = handle.merge(params, extra).detokenize(ids, rng, steps=steps, guidance=guidance)
            return jnp.clip(jnp.round((out + 1) * 127.5), 0, 255).astype(jnp.uint8)

        self._tokenize = jax.jit(tokenize)
        self._detokenize = jax.jit(detokenize, static_argnames=("steps", "guidance"))

    @classmethod
    def from_workdir(cls, workdir: str) -> FlexTokTokenizer:
        return cls(load_config(workdir), workdir)

    def check_images(self, images: np.ndarray) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            h, w, c = self.image_shape
            raise ValueError(
                f"images must have shape [B, {h}, {w}, {c}] for this tokenizer, "
                f"got {tuple(images.shape)}"
            )

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, C] (or float in [-1, 1]) -> int32 [B, N], ordered coarse to fine."""
        images = np.asarray(images)
        self.check_images(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 127.5 - 1
        return np.asarray(self._tokenize(self.params, self.extra, jnp.asarray(images, jnp.float32)))

    def detokenize(
        self, ids: np.ndarray, *, steps: int = 25, guidance: float = 1.0, seed: int = 0
    ) -> np.ndarray:
        """int [B, k] (the first k tokens, 1 <= k <= N) -> uint8 images [B, H, W, C]."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"token ids must have shape [B, k], got {ids.shape}")
        if not 1 <= ids.shape[1] <= self.num_tokens:
            raise ValueError(
                f"detokenize takes 1 to {self.num_tokens} tokens per image, got k={ids.shape[1]}"
            )
        self.model.fsq.check_ids(ids)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        rng = jax.random.key(seed)
        out = self._detokenize(
            self.params, self.extra, jnp.asarray(ids, jnp.int32), rng, int(steps), float(guidance)
        )
        return np.asarray(out)
