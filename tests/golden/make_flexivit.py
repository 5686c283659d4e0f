"""Makes golden/flexivit_tiny.npz: big_vision's own FlexiViT on seeded random weights.

    cd /tmp/bv  # a checkout of google-research/big_vision (HEAD 0127fb6b was used)
    PYTHONPATH=/tmp/bv:/work/main python /work/main/tests/golden/make_flexivit.py

Weights: ``official_layouts.flexivit_arrays(0)`` (a 2-block, width-32 FlexiViT with an 8x8
stored kernel and a 3x3 stored position embedding) loaded into
``big_vision.models.proj.flexi.vit.Model(5, patch_size=(8, 8), posemb_size=(3, 3), width=32,
depth=2, mlp_dim=64, num_heads=2, pool_type="tok")``; images: ``flexivit_images(1)`` (two
24x24 RGB in [-1, 1]). Stored: the logits at seqhw 2, 3, 4, 6 and 8 (patch sizes 12, 8, 6, 4,
3: kernel upsampled, native, and shrunk, which is where big_vision's non-antialiased
PI-resize differs from an antialiased one), float32 on CPU.
"""

import os

import jax
import numpy as np
from big_vision.models.proj.flexi import vit

from tests.official_layouts import FLEXIVIT_TINY, flexivit_arrays, flexivit_images

SEQHW = (2, 3, 4, 6, 8)


def nest(flat: dict) -> dict:
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    d = FLEXIVIT_TINY
    model = vit.Model(
        d["classes"], patch_size=(d["kernel"],) * 2, posemb_size=(d["grid"],) * 2,
        width=d["width"], depth=d["depth"], mlp_dim=d["mlp"], num_heads=d["heads"],
        pool_type="tok",
    )  # fmt: skip
    params = nest(flexivit_arrays(0))
    images = flexivit_images(1)
    out = {}
    for s in SEQHW:
        logits, _ = model.apply({"params": params}, images, seqhw=s)
        out[f"logits_seqhw{s}"] = np.asarray(logits, np.float32)
    path = os.path.join(os.path.dirname(__file__), "flexivit_tiny.npz")
    np.savez(path, **out)
    print({k: v.shape for k, v in out.items()}, "->", path)


if __name__ == "__main__":
    main()
