"""Convert a released checkpoint into a vitok run directory.

    python -m vitok.tools.convert --from=flexivit --checkpoint=flexivit_b_i1k.npz \
        --workdir=workdirs/flexivit_b_i1k [--config=configs/vit.py:flexivit_i1k] \
        [--config.model.dtype=float32 ...]

The run (config.json + an orbax checkpoint at step 0) is read by ``vitok.inference``, the
tools, the evaluators and ``init_from`` like any trained run; its config is the converter's
preset (or --config) with the model's sizes taken from the checkpoint. A checkpoint whose
names or shapes differ from the release's layout is refused with the first mismatches, and
nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from vitok import runs
from vitok.config import load_preset
from vitok.interop import CONVERTERS, ConversionError, check_layout
from vitok.models import ModelHandle
from vitok.models.transfer import flatten_params, unflatten_like
from vitok.tools import parse_with_config_overrides


def as_model_params(handle: ModelHandle, params: dict, where: str) -> dict:
    """A converter's nested dict -> params with the model's exact structure and dtypes;
    ConversionError naming the first leaves that are missing, extra or of another shape."""
    return as_tree_like(handle.abstract_params(), params, where)


def as_tree_like(abstract: dict, params: dict, where: str) -> dict:
    """``params`` with the structure and dtypes of ``abstract`` (ShapeDtypeStructs)."""
    wanted = flatten_params(abstract)
    given = flatten_params(params)
    check_layout(
        {"/".join(p): np.asarray(v) for p, v in given.items()},
        {"/".join(p): tuple(s.shape) for p, s in wanted.items()},
        f"the model converted from {where}",
    )
    leaves = {p: np.asarray(given[p], dtype=wanted[p].dtype) for p in wanted}
    return unflatten_like(abstract, leaves)


def check_extra(handle: ModelHandle, given, where: str) -> None:
    """Every non-parameter variable of a converted model comes from the release: a model with
    state the converter does not give (``given``: the sub-models it gives) is an error."""
    missing = [name for name in handle.abstract_extra() if name not in given]
    if missing:
        raise ConversionError(
            f"the model converted from {where} has state the release does not give: {missing}"
        )


def convert(name: str, checkpoint: str, workdir: str, config_spec: str = "", overrides=()) -> None:
    converter = CONVERTERS.lookup(name)
    if os.path.exists(os.path.join(workdir, "config.json")):
        raise FileExistsError(f"{workdir} already holds a run; give a new --workdir")
    preset = getattr(converter, "default_preset", sys.modules[converter.__module__].DEFAULT_PRESET)
    config = load_preset(config_spec or preset, tuple(overrides))
    config, params, *rest = converter(checkpoint, config)
    subruns = rest[0] if rest else {}
    # Frozen sub-models (FlexTok's VAE) become runs of their own inside the run directory,
    # which the model's section points to; their weights are also the run's own.
    sub_params = {}
    for attribute, (sub_config, weights) in subruns.items():
        sub_handle = ModelHandle.abstract(sub_config.model, int(sub_config.get("seed", 0)))
        check_extra(sub_handle, (), checkpoint)
        sub_params[attribute] = (sub_config, as_model_params(sub_handle, weights, checkpoint))
        config.model[attribute].checkpoint = os.path.join(os.path.abspath(workdir), attribute)
    handle = ModelHandle.abstract(config.model, int(config.get("seed", 0)))
    params = as_model_params(handle, params, checkpoint)
    check_extra(handle, sub_params, checkpoint)
    extra = {}
    for attribute, (_, weights) in sub_params.items():
        extra[attribute] = as_tree_like(handle.abstract_extra()[attribute], weights, checkpoint)
    for attribute, (sub_config, weights) in sub_params.items():
        runs.write_run(os.path.join(workdir, attribute), sub_config, weights, {})
    runs.write_run(workdir, config, params, extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--from", dest="name", required=True, help="the release: " + ", ".join(CONVERTERS.names())
    )
    parser.add_argument("--checkpoint", required=True, help="the downloaded weights file")
    parser.add_argument("--workdir", required=True, help="the run directory to write (new)")
    parser.add_argument(
        "--config", default="", help="configs/NAME.py:PRESET (default: the converter's)"
    )
    args, overrides = parse_with_config_overrides(parser, argv)
    try:
        convert(args.name, args.checkpoint, args.workdir, args.config, overrides)
    except (ConversionError, FileExistsError, KeyError, ValueError) as e:
        sys.exit(f"vitok.tools.convert: {e}")
    print(f"vitok: wrote {args.name} checkpoint {args.checkpoint} as the run {args.workdir}")


if __name__ == "__main__":
    main()
