"""Python snippets the lifecycle runs on a target through `Backend.run_python`.

Each snippet is self-contained (stdlib only), takes its arguments as one JSON literal substituted
for `__ARGS__`, is safe to run twice, and prints exactly one line `__VERSA_RUNNER__ <json>`
(versa_spec §8.2: never "the first line that starts with {"). Snippets never carry secrets.
"""

from __future__ import annotations

import json
from typing import Any

from versa_runner.backends.base import SENTINEL
from versa_runner.errors import TargetError

PREFLIGHT = r"""
import importlib.util, json, os, platform, shutil, subprocess, sys
args = json.loads(__ARGS__)
root = args["root"]
os.makedirs(root, exist_ok=True)
gpus = []
if shutil.which("nvidia-smi"):
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        gpus = []
print(__SENTINEL__ + json.dumps({
    "python": platform.python_version(), "executable": sys.executable,
    "papermill": importlib.util.find_spec("papermill") is not None,
    "ipykernel": importlib.util.find_spec("ipykernel") is not None,
    "free_bytes": shutil.disk_usage(root).free, "gpus": gpus, "host": platform.node(),
}))
"""

# Idempotent: a second call for the same run dir reports the first launch instead of starting
# another launcher (the `pid` file is written right after Popen).
LAUNCH = r"""
import json, os, subprocess, sys
args = json.loads(__ARGS__)
run_dir = args["run_dir"]
pid_file = os.path.join(run_dir, "pid")
if os.path.exists(pid_file):
    with open(pid_file) as fh:
        pid = int(fh.read().strip())
    print(__SENTINEL__ + json.dumps({"pid": pid, "already_launched": True}))
    raise SystemExit(0)
log = open(os.path.join(run_dir, "run.log"), "ab")
proc = subprocess.Popen(
    [sys.executable, os.path.join(run_dir, "launcher.py"), run_dir],
    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
    start_new_session=True, cwd=args["cwd"],
)
tmp = pid_file + ".tmp"
with open(tmp, "w") as fh:
    fh.write(f"{proc.pid}\n")
os.replace(tmp, pid_file)
print(__SENTINEL__ + json.dumps({"pid": proc.pid, "already_launched": False}))
"""

# SIGTERM the launcher's group (the launcher forwards it to papermill and the kernel), wait the
# grace period for `exit_code`, then SIGKILL the group and every descendant still alive.
KILL = r"""
import json, os, signal, time
args = json.loads(__ARGS__)
run_dir = args["run_dir"]

def ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])

def tree(root):
    parent, pgid = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(entry)], pgid[int(entry)] = int(fields[1]), int(fields[2])
    found, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = pgid[child]
                frontier.append(child)
    return found

def send(targets, groups, sig):
    for g in groups:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    for p in targets:
        try:
            os.kill(p, sig)
        except OSError:
            pass

with open(os.path.join(run_dir, "status.json")) as fh:
    status = json.load(fh)
pid, pgid = status["pid"], status["pgid"]
exit_file = os.path.join(run_dir, "exit_code")
result = {"signalled": False, "escalated": False, "reason": ""}
launcher_alive = ticks(pid) is not None and ticks(pid) == status.get("pid_start_ticks")
papermill = status.get("papermill_pid")
papermill_alive = bool(papermill) and ticks(papermill) is not None and ticks(papermill) == status.get("papermill_start_ticks")
if os.path.exists(exit_file):
    result["reason"] = "already ended"
elif not launcher_alive and not papermill_alive:
    result["reason"] = "no process of the run is alive (or its pids were reused)"
else:
    procs = {}
    roots = [p for p, alive in ((pid, launcher_alive), (papermill, papermill_alive)) if alive]
    for root in roots:
        procs.update(tree(root))
    if launcher_alive:  # the launcher forwards SIGTERM to papermill's group and the kernel's
        send([], [pgid], signal.SIGTERM)
    else:  # stale run: the launcher died, papermill and the kernel may still be running
        procs[papermill] = papermill
        send(list(procs), set(procs.values()), signal.SIGTERM)
    result["signalled"] = True
    deadline = time.monotonic() + args["grace_s"]
    while time.monotonic() < deadline and not os.path.exists(exit_file):
        for root in roots:
            if ticks(root) is not None:
                procs.update(tree(root))
        if not launcher_alive and all(ticks(p) is None for p in procs):
            break
        time.sleep(0.2)
    own = [pid] if launcher_alive else []  # never signal a pid we could not verify
    alive = [p for p in list(procs) + own if ticks(p) is not None]
    if alive:
        result["escalated"] = True
        groups = set(procs.values()) | ({pgid} if launcher_alive else set())
        send(alive, groups, signal.SIGKILL)
if not os.path.exists(exit_file):
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    for name, text in (("exit_code", "137\n"), ("status.json", None)):
        if text is None:
            status.update(state="killed", exit_code=137, ended_at=now)
            text = json.dumps(status, indent=2, sort_keys=True)
        tmp = os.path.join(run_dir, name + ".kill.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(run_dir, name))
print(__SENTINEL__ + json.dumps(result))
"""


def render(template: str, args: dict[str, Any]) -> str:
    """Fill a snippet template with its JSON arguments and the sentinel."""
    return template.replace("__ARGS__", repr(json.dumps(args))).replace(
        "__SENTINEL__", repr(SENTINEL)
    )


def parse_reply(stdout: str, *, what: str) -> dict[str, Any]:
    """The JSON after the sentinel in a snippet's concatenated stdout."""
    for line in stdout.splitlines():
        if line.startswith(SENTINEL):
            return json.loads(line[len(SENTINEL) :])
    tail = stdout.strip().splitlines()[-3:]
    raise TargetError(f"{what}: the target sent no reply line (stdout tail: {tail!r})")
