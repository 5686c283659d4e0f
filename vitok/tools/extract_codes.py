"""Write a dataset's token codes to disk, so that generators train on pre-extracted codes.

    python -m vitok.tools.extract_codes --workdir=workdirs/fsq_mnist \
        --out='codes/mnist_{split}.npz' [--splits=train,test] [--flip]

Reads every example of each split through the tokenizer run's deterministic eval data config
(``config.evals.<first>.data``, the split replaced; ``--data_source``/``--data_name`` point it
at another dataset, ``--data_path`` at a folder of images: ``--data_source=folder
--data_path=DIR``, class sub-folders giving the labels), tokenizes it with the trained tokenizer (any ``vitok.models.Tokenizer``)
and writes one .npz per split with ``codes`` (int32 [N, h, w] from an FSQ autoencoder run, or [N, T] coarse-to-fine 1D tokens
from a FlexTok run) and ``label`` (int32 [N]; -1 when the data has no labels).
``--num_examples`` overrides the size of a generated source (photo_crops).
``--flip`` adds each image's horizontal mirror as a second example (the papers extract codes of
flipped crops too). The file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

import ml_collections
import numpy as np

from vitok.data import pipeline
from vitok.inference import Tokenizer
from vitok.tools import add_tokenize_options, tokenize_options


def data_config(
    config, split: str, source: str = "", name: str = "", num_examples: int = 0, path: str = ""
):
    """The tokenizer run's first eval data config, for ``split`` (optionally another source,
    which takes its own keys and keeps the pipeline's: pp, threads). "train" is the split the
    tokenizer trained on when its training data has the same source (photo_crops: FlexTok tiny's
    "train_extended")."""
    evals = list(config.get("evals", {}).values())
    if not evals:
        raise ValueError("the tokenizer's config has no evals section to take a data config from")
    data = evals[0].data.copy_and_resolve_references()
    trained = config.get("data", {})
    same = not (source or name) and trained.get("source") == data.get("source")
    if split == "train" and same:
        split = trained.get("split") or split
    if source:
        data = ml_collections.ConfigDict(pipeline.data_section(source, data))
    data.split = split
    if path:
        data.path = path
    if name:
        data.name = name
    if num_examples:
        data.num_examples = num_examples
    return data


def extract(
    tokenizer: Tokenizer, data, batch_size: int = 256, flip: bool = False, **options
) -> tuple[np.ndarray, np.ndarray]:
    """-> (codes int32 [N, *token_shape], labels int32 [N]) of every example of ``data``."""
    codes, labels = [], []
    for batch in pipeline.eval_batches(data, global_batch_size=batch_size):
        keep = batch["mask"] > 0
        images = batch["image"][keep].astype(np.float32)
        label = batch["label"][keep] if "label" in batch else np.full((len(images),), -1)
        variants = [images, images[:, :, ::-1]] if flip else [images]
        for x in variants:
            codes.append(tokenizer.tokenize_padded(x, batch_size, **options))
            labels.append(np.asarray(label, np.int32))
    return np.concatenate(codes).astype(np.int32), np.concatenate(labels)


def save_codes(path: str, codes: np.ndarray, labels: np.ndarray, codebook_size: int) -> None:
    """Writes the .npz atomically: a crash never leaves a truncated codes file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, codes=codes, label=labels, codebook_size=np.int64(codebook_size))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir",
        required=True,
        help="a tokenizer run's workdir (fsq_ae, fsq_vit, flextok, karl)",
    )
    parser.add_argument("--out", required=True, help="output .npz path with {split}")
    parser.add_argument("--splits", default="train,test")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--flip", action="store_true", help="also store mirrored images")
    parser.add_argument("--data_source", default="", help="another data source than the run's")
    parser.add_argument("--data_name", default="", help="tfds dataset name for --data_source")
    parser.add_argument("--data_path", default="", help="the folder of --data_source=folder")
    parser.add_argument("--num_examples", type=int, default=0, help="size of a generated source")
    add_tokenize_options(parser)
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    if len(splits) > 1 and "{split}" not in args.out:
        sys.exit("vitok.tools.extract_codes: --out needs {split} when writing several splits")
    try:
        tokenizer = Tokenizer.from_workdir(args.workdir)
        for split in splits:
            data = data_config(
                tokenizer.config,
                split,
                args.data_source,
                args.data_name,
                args.num_examples,
                args.data_path,
            )
            codes, labels = extract(
                tokenizer, data, args.batch_size, args.flip, **tokenize_options(args)
            )
            path = args.out.format(split=split)
            save_codes(path, codes, labels, tokenizer.codebook_size)
            grid = "x".join(map(str, codes.shape[1:]))
            print(
                f"vitok: wrote {len(codes)} {grid} code grids ({split}, codebook "
                f"{tokenizer.codebook_size}) to {path}"
            )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"vitok.tools.extract_codes: {e}")


if __name__ == "__main__":
    main()
