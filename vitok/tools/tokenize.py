"""Tokenize a folder of images with a trained tokenizer (FlexTok, KARL, an FSQ autoencoder).

    python -m vitok.tools.tokenize --workdir=workdirs/flextok_tiny --images=photos/ \
        --out=tokens.npz [--resize]

KARL takes ``--quality`` (the requested mean L1 error, e.g. 0.05) and ``--budget`` (the most
tokens per image); each image then gets as many tokens as it needs, in one encoder pass.

Writes ``tokens`` (int32 [B, N] coarse to fine for a 1D tokenizer, -1 past an image's length
or at KARL's halted positions;
[B, h, w] for a grid) and ``names`` (each image's path relative to
--images) into the .npz. Images must have the tokenizer's size unless --resize is given (resize
the short side, then centre-crop). Unreadable files stop the run with their name.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from vitok.data import ops
from vitok.data.sources import FolderSource
from vitok.tools import add_tokenize_options, tokenize_options


def read_images(folder: str, shape: tuple[int, int, int], resize: bool) -> tuple[np.ndarray, list]:
    """All images under ``folder`` -> (uint8 [B, H, W, C], relative names)."""
    source = FolderSource(path=folder, split="")
    h, w, c = shape
    pp = f"decode(channels={c})" + (
        f"|resize({min(h, w)})|central_crop(({h}, {w}))" if resize else ""
    )
    transform = ops.parse(pp)
    images, names = [], []
    for i in range(len(source)):
        example = transform(source[i], np.random.default_rng(0))
        image = example["image"]
        name = os.path.relpath(source.files[i], source.root)
        if image.shape != shape:
            raise ValueError(
                f"{name}: image is {image.shape[1]}x{image.shape[0]}, the tokenizer takes "
                f"{w}x{h}; pass --resize to resize and centre-crop"
            )
        images.append(image)
        names.append(name)
    return np.stack(images), names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a tokenizer training run's workdir")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--resize", action="store_true", help="resize + centre-crop to fit")
    parser.add_argument("--batch_size", type=int, default=64)
    add_tokenize_options(parser)
    args = parser.parse_args(argv)

    from vitok.inference import Tokenizer

    try:
        tokenizer = Tokenizer.from_workdir(args.workdir)
        images, names = read_images(args.images, tokenizer.image_shape, args.resize)
    except (ValueError, FileNotFoundError, ops.BadImageError) as e:
        sys.exit(f"vitok.tools.tokenize: {e}")
    options = tokenize_options(args)
    try:
        tokens = np.concatenate(
            [
                tokenizer.tokenize_padded(
                    images[i : i + args.batch_size], args.batch_size, **options
                )
                for i in range(0, len(images), args.batch_size)
            ]
        )
    except ValueError as e:
        sys.exit(f"vitok.tools.tokenize: {e}")
    tmp = args.out + ".tmp.npz"  # renamed when complete: never a truncated tokens file
    np.savez(tmp, tokens=tokens, names=np.asarray(names))
    os.replace(tmp, args.out)
    shape = " x ".join(map(str, tokens.shape))
    print(f"vitok: wrote {shape} tokens to {args.out}")


if __name__ == "__main__":
    main()
