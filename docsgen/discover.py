"""What the references describe, found in the code rather than listed by hand: every module of
the project's packages is imported, then its pydantic-settings models and its Prometheus
registries are collected, so a model or a metric added anywhere appears without touching this."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[1]
# Every package of the project whose modules may hold settings or metrics: the shipped ones, then
# the tooling (the demo's and the bench's settings are read from the environment too).
SHIPPED = ("wis2", "chain", "blocks", "flows", "listener", "worker", "broker", "cli")
TOOLING = ("localnode", "bench")
# Metric families every Python process exposes on the default registry: not the chain's.
_RUNTIME_PREFIXES = ("python_", "process_")


@cache
def project_modules() -> tuple[ModuleType, ...]:
    """Every module of the project's packages, imported (an import error is raised: a module
    that cannot be imported cannot be documented either)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    modules: list[ModuleType] = []
    for name in (*SHIPPED, *TOOLING):
        package = importlib.import_module(name)
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue  # running it is its only purpose
            modules.append(importlib.import_module(info.name))
    return tuple(modules)


def settings_models() -> list[type[BaseSettings]]:
    """The pydantic-settings models defined in the project, in package order."""
    found: list[type[BaseSettings]] = []
    for module in project_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, BaseSettings) and cls is not BaseSettings
                    and cls.__module__ == module.__name__ and cls not in found):
                found.append(cls)
    return found


def shipped(obj: type | ModuleType) -> bool:
    module = obj.__name__ if isinstance(obj, ModuleType) else obj.__module__
    return module.split(".")[0] in SHIPPED


@dataclass(frozen=True)
class MetricInfo:
    """One metric family as a registry holds it."""

    name: str  # as exposed, without the `_total` of counters
    kind: str  # counter, gauge, histogram, summary, info, enum
    documentation: str
    labels: tuple[str, ...]
    owner: str  # module or class whose registry holds it


def _registry_holders(module: ModuleType) -> list[tuple[str, CollectorRegistry]]:
    """The registries a module holds: module-level ones, and those of the classes it defines
    that make their own (`CollectorRegistry(` in `__init__`) and need no argument."""
    found: list[tuple[str, CollectorRegistry]] = [
        (module.__name__, value) for value in vars(module).values()
        if isinstance(value, CollectorRegistry) and value is not REGISTRY
    ]
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__ or "__init__" not in vars(cls):
            continue
        try:
            source = inspect.getsource(cls.__init__)
        except (OSError, TypeError):
            continue
        if "CollectorRegistry(" not in source:
            continue
        signature = inspect.signature(cls)
        if any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in signature.parameters.values()):
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} makes a metrics registry but "
                            "needs arguments: give them defaults so its metrics are documented")
        instance = cls()
        found += [(f"{cls.__module__}.{cls.__qualname__}", value)
                  for value in vars(instance).values() if isinstance(value, CollectorRegistry)]
    return found


def _info(collector: object, owner: str) -> MetricInfo | None:
    name = getattr(collector, "_name", None)
    if not name or name.startswith(_RUNTIME_PREFIXES):
        return None
    return MetricInfo(name=name, kind=getattr(collector, "_type", "unknown"),
                      documentation=getattr(collector, "_documentation", ""),
                      labels=tuple(getattr(collector, "_labelnames", ())), owner=owner)


def _metrics_of(registry: CollectorRegistry, owner: str) -> list[MetricInfo]:
    infos = (_info(c, owner) for c in list(getattr(registry, "_collector_to_names", {})))
    return [info for info in infos if info is not None]


def metrics() -> list[MetricInfo]:
    """Every metric of the project's registries and module-level metrics, sorted by name (the
    default registry's others are Prefect's own, which no process of the chain serves)."""
    found: dict[str, MetricInfo] = {}
    for module in project_modules():
        for value in vars(module).values():  # module-level metrics (on the default registry)
            if isinstance(value, MetricWrapperBase) and (info := _info(value, module.__name__)):
                found.setdefault(info.name, info)
        for owner, registry in _registry_holders(module):
            for metric in _metrics_of(registry, owner):
                found.setdefault(metric.name, metric)
    return sorted(found.values(), key=lambda m: m.name)
