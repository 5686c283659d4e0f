"""Small configs shared by the tests: the presets' code paths with smaller numbers."""

import importlib
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit_cli_args(**steps: int) -> list[str]:
    """``configs/vit.py:tiny`` shrunk for subprocess runs of ``vitok.train`` (a 1-layer width-32
    ViT on 7x7 patches, batch 16, every step logged); ``steps`` override total_steps (40),
    eval_every (20) and checkpoint_every (1000)."""
    run = {"total_steps": 40, "eval_every": 20, "checkpoint_every": 1000, **steps}
    return [
        "--config=configs/vit.py:tiny",
        *(f"--config.{key}={value}" for key, value in run.items()),
        "--config.batch_size=16",
        "--config.log_every=1",
        "--config.model.patch_size=7",
        "--config.model.width=32",
        "--config.model.depth=1",
        "--config.model.mlp_dim=64",
        "--config.model.num_heads=2",
        "--config.evals.test.max_examples=256",
        "--config.peak_flops_per_device=1e9",
    ]


def copy_scanned_into_unrolled(scanned, unrolled, depth: int) -> None:
    """Sets an unrolled ViT's params to a scanned one's (layer i of the stack -> block i)."""
    import jax
    from flax import nnx

    _, scanned_params = nnx.split(scanned, nnx.Param)
    _, unrolled_params = nnx.split(unrolled, nnx.Param)
    s, u = nnx.to_pure_dict(scanned_params), nnx.to_pure_dict(unrolled_params)
    for i in range(depth):
        u["encoder"]["blocks"][i] = jax.tree.map(lambda a, i=i: a[i], s["encoder"]["blocks"])
    for key in s:
        if key != "encoder":
            u[key] = s[key]
    u["encoder"]["norm"] = s["encoder"]["norm"]
    nnx.replace_by_pure_dict(unrolled_params, u)
    nnx.update(unrolled, unrolled_params)


def load_preset(spec: str):
    """'flextok.py:tiny' -> configs/flextok.py's ``get_config("tiny")``."""
    module, preset = spec.split(":")
    return importlib.import_module(f"configs.{module.removesuffix('.py')}").get_config(preset)


def override(c, overrides):
    with c.unlocked():
        for key, value in overrides.items():
            target = c
            *path, last = key.split(".")
            for p in path:
                target = target[p]
            target[last] = value
    return c


def short_run(c, *, steps: int, batch_size: int, eval_every: int = 0, checkpoint_every: int = 0):
    """A test config's run length: log every step; evaluate and checkpoint at the last step
    unless told otherwise."""
    c.total_steps, c.batch_size, c.log_every = steps, batch_size, 1
    c.eval_every = eval_every or steps
    c.checkpoint_every = checkpoint_every or steps
    return c


def small_flextok_config(**overrides):
    """configs/flextok.py:tiny shrunk for fast tests (same code path, smaller numbers)."""
    from configs import flextok

    c = short_run(flextok.get_config("tiny"), steps=4, batch_size=16)
    c.model.image_size = (16, 16)
    c.model.patch_size = 4
    c.model.num_registers = 4
    c.model.fsq_levels = (5, 3)
    for part in (c.model.encoder, c.model.decoder):
        part.width, part.depth, part.num_heads, part.mlp_dim = 32, 1, 2, 64
    c.data.crop_size = 16
    c.evals.recon.data.crop_size = 16
    c.evals.recon.batch_size = 16
    c.evals.recon.max_examples = 16
    c.evals.recon.data.num_examples = 16
    c.evals.recon.steps = 2
    c.evals.recon.grid_rows = 2
    c.evals.recon.baseline_examples = 64
    c.model.linear_fit_examples = 64
    c.peak_flops_per_device = 1e9
    c.optim.warmup_steps = 1
    return override(c, overrides)


def small_vit_config(**overrides):
    """configs/vit.py:tiny shrunk for fast tests (same code path, smaller numbers)."""
    from configs import vit

    c = short_run(vit.get_config("tiny"), steps=6, batch_size=16, eval_every=3, checkpoint_every=2)
    c.model.patch_size = 7
    c.model.width = 32
    c.model.depth = 1
    c.model.mlp_dim = 64
    c.model.num_heads = 2
    c.evals.test.batch_size = 64
    c.evals.test.max_examples = 128
    c.peak_flops_per_device = 1e9
    c.optim.warmup_steps = 2
    c.async_checkpoints = True
    return override(c, overrides)


def small_vae_config(**overrides):
    """configs/vae.py:tiny shrunk for fast tests."""
    from configs import vae

    c = vae.get_config("tiny")
    c.total_steps, c.batch_size, c.log_every = 3, 8, 1
    c.eval_every = c.checkpoint_every = 3
    c.model.image_size = (16, 16)
    c.model.width, c.model.mults, c.model.latent_channels = 8, (1, 2), 4
    c.data.crop_size = c.evals.recon.data.crop_size = 16
    c.evals.recon.max_examples = c.evals.recon.data.num_examples = 8
    c.evals.recon.batch_size = 8
    c.peak_flops_per_device = 1e9
    c.optim.warmup_steps = 1
    return override(c, overrides)


def read_metrics(workdir, prefix=("train/", "eval/")):
    """The rows of a run's metrics.jsonl, keeping ``step`` and the keys with ``prefix``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(prefix)} for r in rows]


def losses(workdir):
    """The logged training losses of a run, in step order."""
    return np.array([r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r])


def small_karl_config(**overrides):
    """configs/karl.py:tiny shrunk for fast tests (same code path, smaller numbers)."""
    from configs import karl

    c = short_run(karl.get_config("tiny"), steps=4, batch_size=16)
    c.model.image_size = (16, 16)
    c.model.max_tokens = 4
    c.model.codebook_size = 32
    c.model.code_dim = 4
    c.model.halt_hidden = 16
    for part in (c.model.encoder, c.model.decoder):
        part.width, part.depth, part.num_heads, part.mlp_dim = 32, 1, 2, 64
    c.karl.budgets = (1, 2, 3, 4, 5)
    c.data.crop_size = 16
    for ev in (c.evals.recon, c.evals.adaptive):
        ev.data.crop_size = 16
        ev.batch_size = ev.max_examples = ev.data.num_examples = 16
        ev.grid_rows = 2
    c.evals.recon.baseline_examples = 64
    c.evals.adaptive.qualities = (0.05, 0.2)
    c.peak_flops_per_device = 1e9
    c.optim.warmup_steps = 1
    return override(c, overrides)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess: ``devices`` CPU devices and the suite's compile flags."""
    level = (
        "" if os.environ.get("VITOK_TEST_XLA_OPT") == "1" else " --xla_backend_optimization_level=0"
    )
    return f"--xla_force_host_platform_device_count={devices}{level}"
