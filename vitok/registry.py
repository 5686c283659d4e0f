"""Name -> constructor registries, so a config string picks models, tasks and evaluators."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any


class Registry:
    """A named table of constructors; ``lookup`` imports ``package.<name>`` on first use, and
    every module of the package when that does not register the name."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._table: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = fn
            return fn

        return wrap

    def lookup(self, name: str) -> Callable[..., Any]:
        if name not in self._table:
            module = name.split(".")[0]
            try:
                importlib.import_module(f"{self.package}.{module}")
            except ModuleNotFoundError as e:
                if e.name != f"{self.package}.{module}":
                    raise
        package = importlib.import_module(self.package)
        # Registered under another module's name (e.g. "ar" in nar); a registry that lives in one
        # module (data sources) has no sub-modules to search.
        if name not in self._table and hasattr(package, "__path__"):
            for info in pkgutil.iter_modules(package.__path__):
                try:
                    importlib.import_module(f"{self.package}.{info.name}")
                except ImportError:  # a module with a missing optional dependency
                    continue
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._table)}")
        return self._table[name]


MODELS = Registry("model", "vitok.models")
TASKS = Registry("task", "vitok.tasks")
EVALUATORS = Registry("evaluator", "vitok.evaluators")
