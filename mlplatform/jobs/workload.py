"""Workloads: a YAML file that names a workload package and configures it.

    workload: underwriting        # the package workloads.underwriting
    platform: local.yaml          # platform config, relative to this file (or an inline mapping)
    data: {applications: 20000}   # the workload's own sections, validated by its Config model

The workload package exposes ``Config`` (a pydantic model with ``extra="forbid"``) and
``run(platform, config, echo)``. ``mlp run FILE`` is ``load_workload(FILE).run()``.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from mlplatform.config import PlatformConfig, format_validation_error, load_config, load_yaml
from mlplatform.errors import ConfigError

__all__ = ["Workload", "load_workload"]


@dataclass(frozen=True)
class Workload:
    name: str
    module: ModuleType
    config: BaseModel
    platform_config: PlatformConfig
    source: str

    def platform(self) -> Any:
        from mlplatform.platform import Platform

        return Platform(self.platform_config)

    def run(self, echo: Callable[[str], None] = print) -> Any:
        """Run the whole workload on a Platform built from its platform config."""
        platform = self.platform()
        try:
            return self.module.run(platform, self.config, echo=echo)
        finally:
            platform.close()


def load_workload(path: str | os.PathLike[str]) -> Workload:
    """Read and validate a workload file.

    Raises:
        ConfigError: the file, its ``workload`` name, its platform config or any section is invalid.
    """
    path = Path(path)
    data = load_yaml(path)
    name = data.get("workload")
    if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ConfigError(f"{path}: 'workload' must name a package under workloads/, e.g. 'underwriting', got {name!r}")
    try:
        module = importlib.import_module(f"workloads.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("workloads"):
            raise ConfigError(f"{path}: workload {name!r} not found (no package workloads.{name})") from None
        raise
    platform_source = data.get("platform", {})
    if isinstance(platform_source, str):
        platform_path = (path.parent / platform_source) if not os.path.isabs(platform_source) else Path(platform_source)
        platform_config = load_config(platform_path)
    elif isinstance(platform_source, dict):
        platform_config = load_config(platform_source)
    else:
        raise ConfigError(f"{path}: 'platform' must be a config file path or a mapping, got {platform_source!r}")
    try:
        config = module.Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, repr(str(path)))) from None
    return Workload(name=name, module=module, config=config, platform_config=platform_config, source=str(path))
