"""Re-evaluates a trained FlexTok run's reconstructions under other sampler settings.

    python experiments/flextok/sampler_sweep.py --workdir=workdirs/flextok_tiny \
        --steps=10,25 --guidance=1.0,1.5 [--time_shift=4.0,2.0]

One evaluation per combination, with the run's own reconstruction evaluator (the same held-out
images, linear-code baseline and table); each writes its table and grids under
``WORKDIR/sampler_sweep/steps{S}_guidance{G}_shift{T}/`` and prints one JSON line. The last line
is a JSON list of every result.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "a FlexTok training run", required=True)
flags.DEFINE_string("steps", "10", "comma list of Euler step counts")
flags.DEFINE_string("guidance", "1.0", "comma list of guidance scales")
flags.DEFINE_string("time_shift", "", "comma list of sampling time shifts (default: the run's)")
flags.DEFINE_string("eval", "recon", "the evaluator of config.evals to run")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)

    from vitok import runs, sharding
    from vitok.registry import EVALUATORS
    from vitok.train import EvalContext

    config = runs.load_config(FLAGS.workdir)
    mesh = sharding.make_mesh({"data": -1})
    rules = runs.sharding_rules(config)
    shifts = [float(s) for s in FLAGS.time_shift.split(",") if s] or [
        float(config.model.time_shift)
    ]
    results = []
    for steps, guidance, shift in itertools.product(
        [int(s) for s in FLAGS.steps.split(",")],
        [float(g) for g in FLAGS.guidance.split(",")],
        shifts,
    ):
        run_config = config.copy_and_resolve_references()
        run_config.model.time_shift = shift
        run = runs.load_run(FLAGS.workdir, mesh, config=run_config)
        params, extra, step = run.params, run.extra, run.step
        name = f"steps{steps}_guidance{guidance:g}_shift{shift:g}"
        out_dir = os.path.join(FLAGS.workdir, "sampler_sweep", name)
        os.makedirs(out_dir, exist_ok=True)
        eval_config = run_config.evals[FLAGS.eval]
        eval_config.steps, eval_config.guidance = steps, guidance
        context = EvalContext(run_config, run.model, mesh, rules, out_dir)
        with sharding.mesh_rules(mesh, rules):
            metrics = EVALUATORS.lookup(eval_config.type)(eval_config, context).evaluate(
                params, extra
            )
        record = {"steps": steps, "guidance": guidance, "time_shift": shift, "step": step}
        record |= {k: round(v, 4) for k, v in metrics.items()}
        results.append(record)
        print(json.dumps(record), flush=True)
        jax.clear_caches()
    print(json.dumps(results), file=sys.stdout)


if __name__ == "__main__":
    app.run(main)
