"""Targets by name: `REGISTRY` maps each name to the function that opens it from options.

`open_backend(name, options)` fails with the list of known names; `choose_target(options)`
says which target the flags (and the environment) name. Backend modules are imported lazily, so
`versa-run --help` loads no transport library. Adding a target is one module with a
`from_options(options, *, root)` function plus one line here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from versa_runner.backends.base import SENTINEL, Backend, RemoteStat, call_target
from versa_runner.backends.jupyter.url import URL_ENV_VARS
from versa_runner.errors import UsageError

# name -> "module:function" taking (TargetOptions, *, root: str | None) and returning a Backend.
REGISTRY: dict[str, str] = {
    "local": "versa_runner.backends.local:from_options",
    "jupyter": "versa_runner.backends.jupyter.backend:from_options",
    "ssh": "versa_runner.backends.ssh.backend:from_options",
}


@dataclass(frozen=True)
class TargetOptions:
    """Everything a target may need from the command line and the environment.

    `ssh` is the `user@host[:port]` spec (from --ssh, or a journal entry's target); `on_secret`
    receives every secret value a backend reads (an SSH key passphrase) so output redacts it.
    """

    output_dir: str = "."
    url: str | None = None
    url_file: str | None = None
    token_file: str | None = None
    kernel_id: str | None = None
    ssh: str | None = None
    ssh_key: str | None = None
    ssh_port: int | None = None
    ssh_python: str | None = None
    ssh_accept_new: bool = False
    remote_root: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    on_secret: Callable[[str], None] = field(default=lambda _value: None)


def choose_target(options: TargetOptions) -> str:
    """The target the options name: ssh for --ssh, jupyter for a URL (flag or env), else local."""
    if options.ssh:
        if options.url or options.url_file:
            raise UsageError("--ssh and --url/--url-file name two targets; give one of them")
        return "ssh"
    if options.remote_root:
        raise UsageError("--remote-root applies to --ssh targets only")
    jupyter_flags = (options.url, options.url_file, options.token_file, options.kernel_id)
    # issue 4: REMOTE_JUPYTER_URL alone selects the Jupyter target (keeps the URL out of argv)
    if any(jupyter_flags) or any(options.environ.get(name) for name in URL_ENV_VARS):
        return "jupyter"
    return "local"


def get_backend_factory(name: str) -> Callable[..., Backend]:
    """The `from_options` function registered under `name`."""
    try:
        target = REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UsageError(f"unknown target {name!r}; known targets: {known}") from None
    module_name, _, function_name = target.partition(":")
    factory: Callable[..., Backend] = getattr(importlib.import_module(module_name), function_name)
    return factory


def open_backend(name: str, options: TargetOptions, *, root: str | None = None) -> Backend:
    """Open the target `name` (`root`: the target root a journaled run recorded)."""
    return get_backend_factory(name)(options, root=root)


def get_backend_class(name: str) -> type:
    """The backend class registered under `name` (the class its factory builds)."""
    factory = get_backend_factory(name)
    module = importlib.import_module(factory.__module__)
    backend_class: type = module.BACKEND_CLASS
    return backend_class


__all__ = [
    "REGISTRY",
    "SENTINEL",
    "Backend",
    "RemoteStat",
    "TargetOptions",
    "call_target",
    "choose_target",
    "get_backend_class",
    "get_backend_factory",
    "open_backend",
]
