"""Evaluators, by name in ``vitok.registry.EVALUATORS``: ``cls(config, context)`` then
``evaluate(params, extra) -> metrics``. Each class declares ``OPTIONS``, its keys of a
``config.evals.<name>`` section with their defaults, beside the trainer's ``EVAL_KEYS``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitok.config import REQUIRED, section_options

# The keys the trainer reads from every evaluator section (batch_size 0: the training batch).
EVAL_KEYS = {"type": REQUIRED, "data": None, "batch_size": 0, "max_examples": 0}


def evaluator_options(
    config: Mapping[str, Any], options: Mapping[str, Any], where: str = ""
) -> dict[str, Any]:
    """An evaluator section with every default filled in; a key that neither the trainer nor
    the evaluator reads is an error naming it."""
    where = where or f"config.evals.<{config.get('type', '?')}>"
    return section_options(config, {**EVAL_KEYS, **options}, where)
