"""Code that runs on the target: standard library only, never `versa_runner` itself.

- `launcher`: supervises one job (status.json, heartbeat, bootstrap, papermill, kill);
- `ops` / `fileops`: what the host asks of a target (preflight, launch, kill, manifest, code
  extraction, root discovery, upload steps);
- `packages`: the bootstrap step that installs what a task imports;
- `reply`: the one reply format (a sentinel line with JSON), `proc`: the one `/proc` reader,
  `files`: atomic writes, `layout`: the run directory's file names;
- `bundle` (host side): ships the modules, as a program for `run_python` or as `launcher.pyz`.

Each module imports only the standard library and its siblings (relative imports), so the same
files run here, in tests, inside `launcher.pyz`, and installed in memory by `bundle.program`.
"""

from __future__ import annotations
