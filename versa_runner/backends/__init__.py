"""Targets by name. `get_backend_class(name)` fails with the list of known names."""

from __future__ import annotations

import importlib

from versa_runner.backends.base import SENTINEL, Backend, RemoteStat
from versa_runner.errors import UsageError

# name -> "module:Class"; imported lazily so `versa-run --help` loads no transport library.
REGISTRY: dict[str, str] = {
    "local": "versa_runner.backends.local:LocalBackend",
    "jupyter": "versa_runner.backends.jupyter:JupyterBackend",
    "ssh": "versa_runner.backends.ssh:SshBackend",
}


def get_backend_class(name: str) -> type:
    """The backend class registered under `name`."""
    try:
        target = REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UsageError(f"unknown target {name!r}; known targets: {known}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["SENTINEL", "Backend", "RemoteStat", "REGISTRY", "get_backend_class"]
