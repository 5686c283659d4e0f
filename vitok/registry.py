"""Name -> constructor registries: one mechanism for models, tasks, evaluators, data sources,
preprocessing ops and attention backends.

A name registers once (a second registration is an error). A lookup of an unknown name fails
with the known names. Registries over a package (models, tasks, evaluators) import
``package.<module>`` on first use, where the module is the name itself or, for a family that
registers several names in one module, its entry in ``modules``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any


class Registry:
    """A named table of constructors (``@REGISTRY.register(name)``, ``REGISTRY.lookup(name)``)."""

    def __init__(self, kind: str, package: str | None = None, modules: Mapping[str, str] = {}):
        self.kind = kind
        self.package = package
        self.modules = dict(modules)  # name -> module of the package that registers it
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = fn
            return fn

        return wrap

    def lookup(self, name: str) -> Callable[..., Any]:
        if name not in self._table and self.package is not None:
            self._import(self.modules.get(name, name))
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._table[name]

    def __contains__(self, name: str) -> bool:
        try:
            self.lookup(name)
        except ValueError:
            return False
        return True

    def names(self) -> list[str]:
        """Every registered name (a package registry first imports all its modules)."""
        if self.package is not None:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                self._import(info.name)
        return sorted(self._table)

    def _import(self, module: str) -> None:
        try:
            importlib.import_module(f"{self.package}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{self.package}.{module}":  # a dependency of an existing module
                raise


MODELS = Registry("model", "vitok.models", modules={"fsq_ae": "vae", "vq_ae": "vq", "ar": "nar"})
TASKS = Registry("task", "vitok.tasks", modules={"fsq_ae": "vae", "vq_ae": "vae"})
EVALUATORS = Registry("evaluator", "vitok.evaluators", modules={"adaptive_length": "adaptive"})
