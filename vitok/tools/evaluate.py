"""Run a run's evaluators on its weights, without training (a converted release, a finished run).

    python -m vitok.tools.evaluate --workdir=workdirs/flexivit_b_i1k \
        [--config.evals.test.data.data_dir=DIR ...] [--only=test,test_p8] [--out=metrics.json]

The evaluators are the run's ``config.evals`` (with any ``--config.a.b=v`` overrides, checked
as at training start-up); the weights are its latest good checkpoint's (EMA if kept), laid
out on the run's mesh. Prints one JSON line of metrics; images the evaluators write go into
the workdir.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from vitok import config as config_lib
from vitok import runs, sharding
from vitok.registry import EVALUATORS
from vitok.tools import parse_with_config_overrides
from vitok.train import EvalContext, run_options


def _declared_evaluator_keys(config: ml_collections.ConfigDict, overrides: list[str]) -> list[str]:
    """Applies ``--config.evals.NAME.KEY=V`` where the run's section lacks KEY but its
    evaluator declares it (``OPTIONS``, e.g. ``inception_weights`` on a run that had none);
    returns the other overrides, for the flags parser."""
    rest = []
    for override in overrides:
        path, _, value = override.removeprefix("--config.").partition("=")
        parts = path.split(".")
        section = (
            config.get("evals", {}).get(parts[1])
            if len(parts) == 3 and parts[0] == "evals"
            else None
        )
        if section is not None and parts[2] not in section and "type" in section:
            options = getattr(EVALUATORS.lookup(section.type), "OPTIONS", {})
            if parts[2] in options:
                try:
                    section[parts[2]] = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    section[parts[2]] = value
                continue
        rest.append(override)
    return rest


def _with_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
    config = config_lib.switch_sources(config, overrides)
    overrides = _declared_evaluator_keys(config, overrides)
    values = flags.FlagValues()
    argv = ["vitok", *overrides]
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=argv)
        values(argv)
        return values.config
    except AttributeError as e:  # how the flags parser reports a key the config lacks
        key = str(e).splitlines()[0].strip("'\"")
        raise config_lib.ConfigError(f"unknown config key {key!r}") from None


def evaluate(workdir: str, overrides: list[str] = (), only: tuple[str, ...] = ()) -> dict:
    config = _with_overrides(runs.load_config(workdir), list(overrides))
    config_lib.validate(config)
    evals = run_options(config)["evals"]
    unknown = [name for name in only if name not in evals]
    if unknown:
        raise ValueError(f"unknown evaluator {unknown[0]!r}; the run has {sorted(evals)}")
    mesh = sharding.make_mesh(config.mesh)
    run = runs.load_run(workdir, mesh, config=config)
    context = EvalContext(config, run.model, mesh, runs.sharding_rules(config), workdir)
    results = {"step": run.step}
    for name, ev in evals.items():
        if not only or name in only:
            results.update(EVALUATORS.lookup(ev.type)(ev, context).evaluate(run.params, run.extra))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run directory (trained or converted)")
    parser.add_argument("--only", default="", help="comma-separated evaluator names")
    parser.add_argument("--out", default="", help="also write the metrics here (JSON)")
    args, overrides = parse_with_config_overrides(parser, argv)
    only = tuple(n for n in args.only.split(",") if n)
    try:
        results = evaluate(args.workdir, overrides, only)
    except (
        runs.RunNotFoundError, config_lib.ConfigError, flags.Error, FileNotFoundError, KeyError,
        ValueError,
    ) as e:  # fmt: skip
        sys.exit(f"vitok.tools.evaluate: {e}")
    line = json.dumps({k: float(v) for k, v in results.items()})
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
