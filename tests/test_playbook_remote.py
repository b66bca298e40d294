"""A playbook job on a real Jupyter server on loopback: the code sync ships `versa_runner`, the
driver runs from the synced tree, its reports come back with `sync` (no GPU steps: the
decode comparison needs no kernel, so this checks the remote path, not the model code)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from runner_support import cli, only_run_id, runner_env

if TYPE_CHECKING:
    from jupyter_fixtures import JupyterServer

pytest_plugins = ["jupyter_fixtures"]
pytestmark = pytest.mark.slow


def test_playbook_job_runs_from_the_synced_tree_and_syncs_its_reports(
    basepath_server: JupyterServer, tmp_path: Path
) -> None:
    server = basepath_server
    out = tmp_path / "out"
    out.mkdir()
    work = f"pb_{uuid.uuid4().hex[:8]}"  # the server is shared by the session
    for name, tok_s in (("base", 100.0), ("pruned", 125.0)):
        path = server.root_dir / work / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "schema_version": 1, "name": name, "engine": "native", "prompt_len_tokens": 8,
            "max_new_tokens": 4, "repeats": 1,
            "results": [{"batch_size": 1, "tok_s_total": tok_s}]}))  # fmt: skip
    plan = {"schema_version": 1, "name": work, "steps": [{"name": "compare", "summarize_decode": {
        "base": f"{work}/base.json", "pruned": f"{work}/pruned.json",
        "out_md": f"reports/{work}_decode.md"}}]}  # fmt: skip
    url_file = tmp_path / "url"
    url_file.write_text(server.url + "\n")
    args = ["submit", "--task", "playbook", "--plan", json.dumps(plan), "--no-detach",
            "--url-file", str(url_file)]  # fmt: skip
    if server.token:
        (tmp_path / "token").write_text(server.token + "\n")
        args += ["--token-file", str(tmp_path / "token")]
    done = cli(args, out, runner_env(tmp_path), timeout_s=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = only_run_id(out)
    assert f"driver {server.root_dir / 'versa_code'}" in done.stdout  # the synced copy ran
    assert "decode pruned/base: bs1 1.25x" in done.stdout
    report = out / "reports" / f"{work}_decode.md"  # synced back
    assert "| 1 | 100.0 | 125.0 | 1.250 |" in report.read_text()
    record = json.loads((out / "reports" / f"playbook_{run_id}.json").read_text())
    assert record["state"] == "succeeded" and record["reports"][0] == f"reports/{work}_decode.md"
