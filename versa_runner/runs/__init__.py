"""Runs: everything about a run above the backends, one module per idea.

- `journal`: the local record of each run (`.versa_runner/runs/<run_id>.json`), RUN resolution;
- `lifecycle`: preflight, stage, launch, kill (written once for every backend);
- `status`: a run's state and progress, derived from its files; `logs`: log reads, follow, wait;
- `sync`: outputs back home, verified and resumable; `codesync`: the code tree out to a target;
- `bootstrap`: what a remote profile installs and sets; `prepare`: code sync + bootstrap for
  one submit; `secrets`: job environment, secret forwarding and redaction.

Nothing is imported here: each command loads only the modules it uses.
"""

from __future__ import annotations
