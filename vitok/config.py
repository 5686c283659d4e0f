"""Command line and config checks shared by every entry point.

Configs are ``configs/<name>.py`` files with ``get_config(preset: str)``; any field can be
overridden as ``--config.optim.lr=3e-4``. Unknown keys, wrong types and unknown presets fail at
start-up with a message that names them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from vitok.data.pipeline import check_data_config, data_section

REQUIRED_KEYS = ("seed", "total_steps", "eval_every", "checkpoint_every", "batch_size")


class ConfigError(ValueError):
    pass


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # a key with no default in ``section_options``


def section_options(
    section: Mapping[str, Any] | None, defaults: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """``defaults`` (key -> default, or ``REQUIRED``) updated with ``section``'s keys: the one
    place a component's defaults live. A key ``defaults`` does not have, or a missing required
    one, is a ConfigError naming ``where.key`` and the keys ``where`` takes."""
    given = dict(section or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown config key '{where}.{unknown[0]}'; {where} takes {sorted(defaults)}"
        )
    missing = [k for k, v in defaults.items() if v is REQUIRED and k not in given]
    if missing:
        raise ConfigError(f"{where} needs the key '{missing[0]}'")
    return {**defaults, **given}


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the keys every training config must have and their basic sanity."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"config is missing required top-level keys {missing}")
    for key in ("total_steps", "eval_every", "checkpoint_every", "batch_size"):
        if not isinstance(config[key], int) or config[key] <= 0:
            raise ConfigError(f"config.{key} must be a positive integer, got {config[key]!r}")
    for section in ("model", "data", "optim", "mesh", "sharding"):
        if section not in config:
            raise ConfigError(f"config is missing the section config.{section}")
    sections = {"config.data": config.data}
    for name, evaluator in config.get("evals", {}).items():
        if "data" in evaluator:
            sections[f"config.evals.{name}.data"] = evaluator.data
    try:
        for where, section in sections.items():
            check_data_config(section, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def adamw_section(
    lr: float,
    *,
    b2: float,
    weight_decay: float,
    warmup_steps: int = 100,
    schedule: str = "cosine",
    b1: float = 0.9,
    clip_norm: float = 1.0,
    ema_decay: float = 0.0,
) -> ml_collections.ConfigDict:
    """``config.optim`` for AdamW (``vitok.optim.make_optimizer``): warmup, then ``schedule``."""
    return ml_collections.ConfigDict(
        dict(name="adamw", lr=lr, warmup_steps=warmup_steps, schedule=schedule, b1=b1, b2=b2,
             weight_decay=weight_decay, clip_norm=clip_norm, ema_decay=ema_decay)
    )  # fmt: skip


def frozen_kl_vae_section(latent_channels: int = 16) -> ml_collections.ConfigDict:
    """A frozen sub-model section for configs/vae.py:imagenet256_f8c{4,8,16}'s autoencoder (f8,
    channel mults 1,2,4,4, 2 ResBlocks, base width 128, bf16), the latent space of FlexTok's
    and KARL's full-scale presets. ``checkpoint``: the workdir of its training run (required;
    loaded when the run that uses it starts)."""
    return ml_collections.ConfigDict(
        dict(name="vae", checkpoint="", image_size=(256, 256), channels=3,
             latent_channels=latent_channels, width=128, mults=(1, 2, 4, 4), blocks=2,
             latent_scale=1.0, dtype="bfloat16")
    )  # fmt: skip


def mesh_section(
    data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1
) -> ml_collections.ConfigDict:
    """``config.mesh``: devices per mesh axis, -1 = the rest (default: pure data parallel)."""
    return ml_collections.ConfigDict(
        {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}
    )


def sharding_section() -> ml_collections.ConfigDict:
    """``config.sharding``: the default logical-axis -> mesh-axis rules."""
    from vitok.sharding import DEFAULT_RULES

    return ml_collections.ConfigDict({"rules": DEFAULT_RULES})


def init_from_section(workdir: str = "", skip: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """``config.init_from``: start a fresh run from ``workdir``'s weights, keeping the params
    whose 'a/b/c' paths match a ``skip`` pattern at their init (``vitok.models.transfer``)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    return ml_collections.ConfigDict({"workdir": workdir, "skip": skip})


def unknown_preset(name: str, preset: str, known) -> ConfigError:
    return ConfigError(
        f"unknown preset {preset!r} for configs/{name}.py; known presets: {sorted(known)}"
    )


@dataclasses.dataclass
class CommandLine:
    config: ml_collections.ConfigDict
    workdir: str
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    distributed: bool
    cpu_collectives: str | None
    debug: bool = False


def parse_command_line(argv: list[str]) -> CommandLine:
    """Parses ``--config=FILE:PRESET --workdir=DIR [--config.x.y=v ...]`` and the multi-host
    flags. Raises SystemExit with a message naming a bad flag, key, type or preset."""
    values = flags.FlagValues()
    try:
        if _source_switches(argv):
            argv = _switch_sources(argv, values)
        else:
            config_flags.DEFINE_config_file(
                "config",
                None,
                "configs/NAME.py:PRESET",
                flag_values=values,
                lock_config=True,
                sys_argv=["vitok"] + list(argv),
            )
            flags.mark_flag_as_required("config", flag_values=values)
        _define_run_flags(values)
        values(["vitok"] + list(argv))
        config = values.config
        if not isinstance(config, ml_collections.ConfigDict):
            config.get("seed")  # an ml_collections error placeholder: raises the load error
        validate(config)
    except ConfigError as e:
        raise SystemExit(f"vitok: bad config: {e}") from None
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError, OSError) as e:
        if isinstance(_root_cause(e), KeyError):
            raise SystemExit(f"vitok: {_unknown_key_message(argv, _root_cause(e))}") from None
        raise SystemExit(f"vitok: bad command line: {_explain(e)}") from None
    return CommandLine(
        config=config,
        workdir=values.workdir,
        coordinator_address=values.coordinator_address,
        num_processes=values.num_processes,
        process_id=values.process_id,
        distributed=values.distributed,
        cpu_collectives=values.cpu_collectives,
        debug=values.debug,
    )


_SOURCE_FLAG = re.compile(r"--config\.((?:\w+\.)*)source=(\w+)")


def _source_switches(argv: list[str]) -> list[tuple[str, str]]:
    """(section path, source) of each ``--config.<section>.source=NAME`` flag."""
    found = [_SOURCE_FLAG.fullmatch(a) for a in argv]
    return [(m.group(1).rstrip("."), m.group(2)) for m in found if m]


def _switch_sources(argv: list[str], values: flags.FlagValues) -> list[str]:
    """Loads the preset, gives each switched data section the new source's keys (so that
    ``--config.data.source=folder --config.data.path=DIR`` works on any preset), and defines
    ``values.config`` as that config; returns argv without the ``--config=FILE`` flag."""
    file_flags = [a for a in argv if a.startswith("--config=")]
    if not file_flags:
        raise ConfigError("--config=configs/NAME.py:PRESET is required")
    config = switch_sources(load_preset(file_flags[-1].removeprefix("--config=")), argv)
    config.lock()
    rest = [a for a in argv if not a.startswith("--config=")]
    config_flags.DEFINE_config_dict(
        "config", config, flag_values=values, lock_config=True, sys_argv=["vitok", *rest]
    )
    return rest


def switch_sources(config: ml_collections.ConfigDict, argv) -> ml_collections.ConfigDict:
    """Gives each data section that a ``--config.<section>.source=NAME`` flag in ``argv``
    switches the new source's keys (its other keys kept where the source takes them), so the
    flags that follow can set them; returns ``config``, changed in place."""
    for path, source in _source_switches(list(argv)):
        *parents, last = path.split(".")
        parent = config
        for key in parents:
            parent = parent[key]
        if last not in parent:
            raise ConfigError(f"unknown config key 'config.{path}.source'")
        parent[last] = ml_collections.ConfigDict(data_section(source, parent[last]))
    return config


def load_preset(spec: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """``"configs/NAME.py:PRESET"`` -> that preset's config, unlocked, with ``overrides``
    (``"--config.a.b=v"`` flags, as on a training command line) applied. A bad file, preset or
    key raises the loader's error."""
    loader = flags.FlagValues()
    argv = ["vitok", f"--config={spec}", *overrides]
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=loader, lock_config=False, sys_argv=argv
    )
    loader(argv)
    config = loader.config
    if not isinstance(config, ml_collections.ConfigDict):
        config.get("seed")  # an ml_collections error placeholder: raises the load error
    return config


def _define_run_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string(
        "workdir", None, "output directory (checkpoints, metrics)", flag_values=values
    )
    flags.mark_flag_as_required("workdir", flag_values=values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0", flag_values=values)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=values)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=values)
    flags.DEFINE_bool("distributed", False, "jax.distributed auto-detection", flag_values=values)
    flags.DEFINE_string(
        "cpu_collectives", "gloo", "CPU collectives for multi-process CPU runs", flag_values=values
    )
    flags.DEFINE_bool(
        "debug", False, "full tracebacks instead of one-line errors (or VITOK_DEBUG=1)",
        flag_values=values,
    )  # fmt: skip


def _explain(error: Exception) -> str:
    """The error's first line, plus the root cause (e.g. the unknown preset) when there is one."""
    text = str(error).strip().splitlines()[0]
    cause = _root_cause(error)
    if cause is not error:
        text += f" -- {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
    return text


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return error


def _unknown_key_message(argv: list[str], error: KeyError) -> str:
    key = str(error.args[0]).splitlines()[0].strip("'\"")
    hint = " ".join(str(error.args[0]).splitlines()[1:])
    flag = next((a.split("=")[0] for a in argv if a.split("=")[0].endswith("." + key)), key)
    return f"unknown config key {flag.removeprefix('--')!r}. {hint}".strip()
