"""Reconstruct images from FlexTok tokens: any first k of each image's N tokens.

    python -m vitok.tools.detokenize --workdir=workdirs/flextok_tiny --tokens=tokens.npz \
        --out=recon/ --k=1,4,32 --steps=25 --guidance=1.0

Writes ``<name>_k<k>.png`` for each image of the .npz (from ``vitok.tools.tokenize``) and each k.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a FlexTok training run's workdir")
    parser.add_argument("--tokens", required=True, help=".npz written by vitok.tools.tokenize")
    parser.add_argument("--out", required=True, help="output folder for PNGs")
    parser.add_argument("--k", default="", help="comma-separated token counts (default: all N)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    from PIL import Image

    from vitok.inference import FlexTokTokenizer

    try:
        with np.load(args.tokens) as data:
            tokens, names = data["tokens"], [str(n) for n in data["names"]]
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"vitok.tools.detokenize: cannot read tokens from {args.tokens!r}: {e}")
    try:
        tokenizer = FlexTokTokenizer.from_workdir(args.workdir)
        counts = [int(k) for k in args.k.split(",")] if args.k else [tokenizer.num_tokens]
        os.makedirs(args.out, exist_ok=True)
        for k in counts:
            for i in range(0, len(tokens), args.batch_size):
                images = tokenizer.detokenize(
                    tokens[i : i + args.batch_size, :k],
                    steps=args.steps,
                    guidance=args.guidance,
                    seed=args.seed,
                )
                for name, image in zip(names[i : i + args.batch_size], images, strict=True):
                    stem = os.path.splitext(name.replace(os.sep, "__"))[0]
                    pixels = image[..., 0] if image.shape[-1] == 1 else image
                    Image.fromarray(pixels).save(os.path.join(args.out, f"{stem}_k{k}.png"))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"vitok.tools.detokenize: {e}")
    print(f"vitok: wrote {len(tokens) * len(counts)} images to {args.out}")


if __name__ == "__main__":
    main()
