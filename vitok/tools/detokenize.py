"""Reconstruct images from tokens written by ``vitok.tools.tokenize``.

    python -m vitok.tools.detokenize --workdir=workdirs/flextok_tiny --tokens=tokens.npz \
        --out=recon/ --k=1,4,32 --steps=25 --guidance=1.0

Writes ``<name>_k<k>.png`` for each image of the .npz and each k (the first k tokens of a 1D
tokenizer; a grid tokenizer decodes its whole grid, ``<name>.png``). ``--steps`` and
``--guidance`` are decode options of tokenizers with a sampler (FlexTok).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a tokenizer training run's workdir")
    parser.add_argument("--tokens", required=True, help=".npz written by vitok.tools.tokenize")
    parser.add_argument("--out", required=True, help="output folder for PNGs")
    parser.add_argument("--k", default="", help="comma-separated token counts (default: all N)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (FlexTok: 25)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance (FlexTok: 1.0)")
    parser.add_argument(
        "--apg", action="store_true", help="adaptive projected guidance (FlexTok's README: 7.5)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    from PIL import Image

    from vitok.inference import Tokenizer

    try:
        with np.load(args.tokens) as data:
            tokens, names = data["tokens"], [str(n) for n in data["names"]]
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"vitok.tools.detokenize: cannot read tokens from {args.tokens!r}: {e}")
    try:
        tokenizer = Tokenizer.from_workdir(args.workdir)
        options = {
            name: value
            for name, value in (("steps", args.steps), ("guidance", args.guidance))
            if value is not None
        }
        if args.apg:
            options["apg"] = True
        if tokenizer.ordered:
            counts = [int(k) for k in args.k.split(",")] if args.k else [tokenizer.num_tokens]
        elif args.k:
            raise ValueError("--k selects first tokens of a 1D tokenizer; this one is a grid")
        else:
            counts = [None]
        os.makedirs(args.out, exist_ok=True)
        for k in counts:
            for i in range(0, len(tokens), args.batch_size):
                batch = tokens[i : i + args.batch_size]
                images = tokenizer.detokenize(
                    batch if k is None else batch[:, :k], seed=args.seed, **options
                )
                for name, image in zip(names[i : i + args.batch_size], images, strict=True):
                    stem = os.path.splitext(name.replace(os.sep, "__"))[0]
                    suffix = "" if k is None else f"_k{k}"
                    pixels = image[..., 0] if image.shape[-1] == 1 else image
                    Image.fromarray(pixels).save(os.path.join(args.out, f"{stem}{suffix}.png"))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"vitok.tools.detokenize: {e}")
    print(f"vitok: wrote {len(tokens) * len(counts)} images to {args.out}")


if __name__ == "__main__":
    main()
