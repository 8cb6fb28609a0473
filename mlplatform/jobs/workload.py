"""Workloads: what ``mlp run FILE`` runs, and the contract a workload meets.

A workload file (YAML) names the workload and configures it:

    workload: underwriting        # a bare name: the package workloads.underwriting
    platform: local.yaml          # platform config, relative to this file (or an inline mapping)
    data: {applications: 20000}   # the workload's own sections, validated by its Config

``workload`` is the import path of the module that is the workload. A dotted path
(``workload: mypackage.scoring``) is imported as written; a bare name is a package of the
project's ``workloads`` folder (``WORKLOAD_NAMESPACE``). It is imported when the file is
loaded; the library imports no workload by name.

The contract — what the module provides:

- ``Config``: a pydantic model (``extra="forbid"``) of the file's other sections (everything
  but ``workload`` and ``platform``).
- ``steps(platform, config) -> Iterable[Step]``: the workload's steps in order
  (:class:`mlplatform.jobs.steps.Step`). The runner advances the iterable only after the
  previous step ran, so a step may be built from what an earlier one wrote (the feature views
  ``apply`` registered). Steps communicate through the storage root, not through each other:
  each finds its inputs where the previous step published them, so one step can run alone
  (``mlp train FILE`` runs the steps named ``train``). Each step says how it knows it is up
  to date (``inputs`` and ``reuse``); the runner decides.
- optionally ``definitions() -> list``: the feature definitions ``mlp apply`` registers.

``mlp run FILE`` is ``load_workload(FILE).run(platform)``: every step through one
:class:`~mlplatform.jobs.steps.StepRunner`. A step named ``deploy`` whose value has a ``url``
is a live endpoint the CLI reports (and, on a terminal with a local Ray, keeps up until Ctrl-C).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from mlplatform.config import PlatformConfig, format_validation_error, load_config, load_yaml
from mlplatform.errors import ConfigError
from mlplatform.jobs.steps import Step, StepRunner

__all__ = ["WORKLOAD_NAMESPACE", "Workload", "load_workload"]

WORKLOAD_NAMESPACE = "workloads"
_CONTRACT_KEYS = ("workload", "platform")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Workload:
    """A loaded workload file: the module, its validated config and the platform config."""

    name: str
    module: ModuleType
    config: BaseModel
    platform_config: PlatformConfig
    source: str

    def steps(self, platform: Any, only: Collection[str] | None = None) -> Iterable[Step]:
        """The workload's steps in order; with ``only``, those with one of these names.

        Raises:
            ConfigError: ``only`` names no step of this workload (when the steps are iterated).
        """
        steps = self.module.steps(platform, self.config)
        if only is None:
            return steps
        return self._only(steps, set(only))

    def _only(self, steps: Iterable[Step], names: set[str]) -> Iterator[Step]:
        found = False
        for step in steps:
            if step.name in names:
                found = True
                yield step
        if not found:
            raise ConfigError(f"{self.source}: workload {self.name!r} has no step named {' or '.join(sorted(names))}")

    def run(self, platform: Any, *, only: Collection[str] | None = None, force: bool = False) -> dict[str, Any]:
        """Run the workload's steps (or those named in ``only``) on ``platform``; returns each
        step's value by ``name`` (``name/target`` for steps with a target)."""
        return StepRunner(platform.storage, force=force).run_all(self.steps(platform, only))

    def definitions(self) -> list[Any]:
        """The workload's feature definitions (``mlp apply``).

        Raises:
            ConfigError: the workload defines none.
        """
        if not hasattr(self.module, "definitions"):
            raise ConfigError(f"{self.source}: workload {self.name!r} has no feature definitions")
        return list(self.module.definitions())


def load_workload(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Workload:
    """Read and validate a workload file.

        workload = load_workload("configs/underwriting.yaml", {"model.tune": None})

    Args:
        path: the YAML file.
        overrides: values that replace the file's, by dotted key into the workload's sections.

    Raises:
        ConfigError: the file, its ``workload`` name, its platform config or any section is
            invalid, or the module is not a workload (no ``Config`` or ``steps``).
    """
    path = Path(path)
    data = load_yaml(path)
    name = data.get("workload")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{path}: 'workload' must be a module path, e.g. 'underwriting' (workloads.underwriting) "
            f"or 'mypackage.myworkload', got {name!r}"
        )
    module_name = name if "." in name else f"{WORKLOAD_NAMESPACE}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"{path}: workload {name!r} not found (no module {module_name})") from None
        raise
    missing = [attr for attr in ("Config", "steps") if not hasattr(module, attr)]
    if missing:
        raise ConfigError(f"{path}: module {module_name} is not a workload: it has no {' or '.join(missing)}")
    platform_source = data.get("platform", {})
    if isinstance(platform_source, str):
        platform_path = (path.parent / platform_source) if not os.path.isabs(platform_source) else Path(platform_source)
        platform_config = load_config(platform_path)
    elif isinstance(platform_source, dict):
        platform_config = load_config(platform_source)
    else:
        raise ConfigError(f"{path}: 'platform' must be a config file path or a mapping, got {platform_source!r}")
    sections = {k: v for k, v in data.items() if k not in _CONTRACT_KEYS}
    for key, value in (overrides or {}).items():
        _set(sections, key.split("."), value)
    try:
        config = module.Config.model_validate(sections)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, repr(str(path)))) from None
    return Workload(
        name=name.rsplit(".", 1)[-1], module=module, config=config, platform_config=platform_config, source=str(path)
    )


def _set(mapping: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        mapping = mapping.setdefault(key, {})
        if not isinstance(mapping, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key!r} is not a section")
    mapping[keys[-1]] = value
