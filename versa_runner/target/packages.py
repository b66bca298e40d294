"""Bootstrap step: make the task's modules importable before papermill starts (stdlib only).

Run by the launcher as `python -c <BOOT> <json args>` (see `runs.bootstrap`): `requirements`
(import name, pip requirement) pairs, `deps_dir` (pip --target when site-packages is read-only),
`make_dirs`, `pip_args`, `always_target`. Exits 0 when every module imports afterwards, 1
otherwise; pip's output goes to run.log. Never sees a secret.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig

PREFIX = "[versa-bootstrap]"


def say(text: str) -> None:
    """One line into run.log."""
    print(f"{PREFIX} {text}", flush=True)


def main(argv: list[str]) -> int:
    """Install what is missing (see the module docstring); returns the exit status."""
    args = json.loads(argv[0])
    for path in args["make_dirs"]:
        os.makedirs(path, exist_ok=True)
    deps = args["deps_dir"]
    if deps not in sys.path:
        sys.path.insert(0, deps)
    wanted = args["requirements"]
    missing = [(mod, req) for mod, req in wanted if importlib.util.find_spec(mod) is None]
    if not missing:
        say(f"all {len(wanted)} required modules import; nothing to install")
        return 0
    site = sysconfig.get_paths()["purelib"]
    use_target = args["always_target"] or not os.access(site, os.W_OK)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    cmd += ["--target", deps] if use_target else []
    cmd += args["pip_args"] + [req for _, req in missing]
    names = ", ".join(mod for mod, _ in missing)
    say(f"installing {names} into {deps if use_target else site}")
    code = subprocess.call(cmd, stdin=subprocess.DEVNULL)
    if code != 0:
        say(f"pip failed with exit code {code}")
        return 1
    importlib.invalidate_caches()
    still = [mod for mod, _ in missing if importlib.util.find_spec(mod) is None]
    if still:
        say("still not importable after install: " + ", ".join(still))
        return 1
    say(f"installed {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
