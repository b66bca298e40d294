"""Names of the files in a run directory `versa_runs/<run_id>/` (versa_spec §8.4).

Shared by the launcher and the ops that run on the target, and by the host lifecycle that reads
them back. Standard library only.
"""

from __future__ import annotations

RUNS_DIR = "versa_runs"
STATUS_FILE = "status.json"
EXIT_CODE_FILE = "exit_code"
HEARTBEAT_FILE = "heartbeat"
LAUNCH_FILE = "launch.json"
SECRETS_FILE = "secrets.env"
LOG_FILE = "run.log"
PID_FILE = "pid"
INPUT_NOTEBOOK = "input.ipynb"
OUTPUT_NOTEBOOK = "output.ipynb"
PARAMS_FILE = "params.yaml"
WRITTEN_FILE = "written.json"  # what the job wrote under its cwd (sync brings these back)
LAUNCHER_ARCHIVE = "launcher.pyz"  # this package as a zip app: `python launcher.pyz <run_dir>`
MANIFEST_CACHE = f"{RUNS_DIR}/manifest_cache.json"  # not hidden: jupyter_server refuses those
CODE_STATE_FILE = "versa_sync.json"  # written last into a complete code extraction (not hidden)
OUTPUT_DIRS = ("artifacts", "reports")  # where jobs write, under the job cwd (the root)
# Shards of a model checkpoint: many GB each, brought back only with `sync --with-checkpoints`.
CHECKPOINT_GLOBS = ("*.safetensors", "*.pt", "*.pth", "*.gguf")
