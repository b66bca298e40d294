"""The playbook driver: runs a plan's steps in order on the target, as one job.

`notebooks/playbook.ipynb` (task `playbook`) starts this module as a subprocess
(`python -m versa_runner.recipes.driver PLAN.json`), so the whole playbook is one detached job:
it survives the laptop closing and is re-attached like any run (`versa-run logs --follow`).

A plan (`versa_runner.recipes.plan`) is a list of steps, each one of
- `task`: a task notebook (validate, build, eaft_single, decode_bench) run with its parameters;
  its executed notebook is kept at `reports/notebooks/<run_id>_<step>.ipynb`;
- `summarize`: the gate summary of two collector runs (with the noise floor when the plan has a
  base-against-base pair), `versa_runner.parity.noise`;
- `summarize_decode`: base and pruned decode side by side, `versa_runner.parity.decode`.

Parameters may refer to what earlier steps wrote: `{"$manifest": {"manifest_json": P, "field":
"variants.NAME"}}` (a dotted path into a build manifest, eaftreap_spec §9.3) and `{"$output":
STEP}` (the JSON a collector or decode step wrote). Every notebook runs in one shared kernel
(nbclient, kernel started once), so torch and the model code load once, not once per step.

The driver stops at the first failing step: it prints which step, why, and where its notebook
is, writes `reports/playbook_<run_id>.json` (every step's state and outputs) and exits 1. A gate
FAIL is a verdict, not a failure: the playbook goes on to decode.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from versa_runner.fsutil import atomic_write_json, atomic_write_text

PLAN_SCHEMA_VERSION = 1
EAFT_OUT_ROOT = "artifacts/eaft_models"
DECODE_OUT_DIR = "artifacts/decode_bench"
NOTEBOOK_COPY_DIR = "reports/notebooks"

__all__ = ["StepFailed", "main", "run_plan", "step_output"]


class StepFailed(RuntimeError):
    """A step of the plan failed; the message names the step, the cause and its notebook."""


def step_output(step: Mapping[str, Any], run_id: str) -> str:
    """Where a step writes its main output (known before it runs; later steps refer to it)."""
    task, params = step.get("task"), step.get("params", {})
    if task == "eaft_single":
        return f"{EAFT_OUT_ROOT}/{step_run_id(run_id, step)}/{params['model_id'].replace('/', '__')}.json"
    if task == "decode_bench":
        return f"{DECODE_OUT_DIR}/{params['name']}.json"
    if task and task.startswith("build_pruned"):  # the checkpoint, else the build's index
        out_dir = str(params.get("out_dir", "")).replace("{run_id}", run_id)
        kind = "keepfrac" if task.endswith("keepfrac") else "budgeted"
        return out_dir or f"artifacts/20b_pruned_models_eaftreap_{kind}/manifest.json"
    if task == "validate_expert_math_toy":
        return "reports/validate_gpt_oss_expert_math_toy.md"
    return str(step.get("summarize", step.get("summarize_decode", {})).get("out_md", ""))


def step_run_id(run_id: str, step: Mapping[str, Any]) -> str:
    """The run id a step's notebook gets (its output folders are named by it)."""
    return f"{run_id}_{step['name']}"


def _dotted(doc: Any, dotted: str, *, where: str) -> Any:
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise StepFailed(f"{where}: no field {dotted!r} (missing {part!r})")
        node = node[part]
    return node


def resolve_refs(value: Any, *, outputs: Mapping[str, str], cwd: Path, run_id: str = "") -> Any:
    """Replace `$manifest` / `$output` references by what earlier steps wrote, and `{run_id}`
    in strings by the playbook's run id."""
    if isinstance(value, list):
        return [resolve_refs(v, outputs=outputs, cwd=cwd, run_id=run_id) for v in value]
    if isinstance(value, str):
        return value.replace("{run_id}", run_id)
    if not isinstance(value, Mapping):
        return value
    if "$output" in value:
        name = value["$output"]
        if name not in outputs:
            raise StepFailed(f"refers to the output of step {name!r}, which has not run")
        return outputs[name]
    if "$manifest" in value:
        ref = value["$manifest"]
        path = cwd / ref["manifest_json"]
        if not path.is_file():
            raise StepFailed(f"manifest {path} does not exist (has its build run here?)")
        doc = json.loads(path.read_text(encoding="utf-8"))
        return str(_dotted(doc, str(ref["field"]), where=str(path)))
    return {k: resolve_refs(v, outputs=outputs, cwd=cwd, run_id=run_id) for k, v in value.items()}


class _Kernel:
    """One kernel for every step notebook (started on first use, shut down at the end)."""

    def __init__(self, *, cwd: Path, kernel_name: str) -> None:
        self.cwd, self.kernel_name = cwd, kernel_name
        self.km: Any = None

    def execute(self, notebook_path: Path, params: Mapping[str, Any], copy_to: Path) -> None:
        import nbformat as _nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
        from papermill.iorw import load_notebook_node
        from papermill.parameterize import parameterize_notebook

        nbformat: Any = _nbformat  # untyped library

        nb = parameterize_notebook(load_notebook_node(str(notebook_path)), dict(params))
        if self.km is None:  # made here, so no client owns (and shuts down) the kernel
            probe = NotebookClient(nbformat.v4.new_notebook(), kernel_name=self.kernel_name)
            self.km = probe.create_kernel_manager()
        client = NotebookClient(
            nb, km=self.km, timeout=None, kernel_name=self.kernel_name,
            resources={"metadata": {"path": str(self.cwd)}},
        )  # fmt: skip
        try:
            client.execute(cwd=str(self.cwd))
        except CellExecutionError as exc:
            raise StepFailed(_error_tail(str(exc))) from exc
        except (DeadKernelError, CellTimeoutError) as exc:  # e.g. out of memory: no traceback
            raise StepFailed(f"{type(exc).__name__}: {_error_tail(str(exc))}") from exc
        finally:
            atomic_write_text(copy_to, nbformat.writes(client.nb))

    def close(self) -> None:
        if self.km is not None and self.km.has_kernel:
            from nbclient.util import run_sync

            run_sync(self.km.shutdown_kernel)(now=True)


def _error_tail(text: str, lines: int = 6) -> str:
    """The last lines of a cell error (the exception, not the whole traceback)."""
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _say(text: str) -> None:
    sys.stdout.write(f"[playbook {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stdout.flush()


def run_plan(
    plan: Mapping[str, Any], *, run_id: str, cwd: Path, notebooks_dir: Path,
    kernel_name: str = "python3",
) -> dict[str, Any]:  # fmt: skip
    """Run every step in order; returns the state record (also written to reports/)."""
    if plan.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise StepFailed(f"plan schema_version {plan.get('schema_version')!r} is not supported")
    steps = list(plan["steps"])
    record: dict[str, Any] = {
        "schema_version": PLAN_SCHEMA_VERSION, "name": plan.get("name", ""), "run_id": run_id,
        "state": "running", "steps": [], "reports": [],
    }  # fmt: skip
    record_path = cwd / "reports" / f"playbook_{run_id}.json"
    outputs: dict[str, str] = {}
    kernel = _Kernel(cwd=cwd, kernel_name=kernel_name)
    try:
        for index, step in enumerate(steps, 1):
            name = step["name"]
            entry = {"name": name, "state": "running", "started": time.time()}
            if "task" in step:  # known before it runs, so a failed step still names it
                entry["notebook"] = f"{NOTEBOOK_COPY_DIR}/{step_run_id(run_id, step)}.ipynb"
            record["steps"].append(entry)
            atomic_write_json(record_path, record)
            _say(f"step {index}/{len(steps)} {name}: {_describe(step)}")
            try:
                entry.update(_run_step(step, run_id=run_id, cwd=cwd, outputs=outputs,
                                       notebooks_dir=notebooks_dir, kernel=kernel))  # fmt: skip
            except StepFailed as exc:
                entry.update(state="failed", error=str(exc), seconds=time.time() - entry["started"])
                record["state"] = "failed"
                record["failed_step"] = name
                atomic_write_json(record_path, record)
                where = f"; its notebook: {entry['notebook']}" if entry.get("notebook") else ""
                raise StepFailed(
                    f"step {index}/{len(steps)} {name!r} failed: {exc}{where}. "
                    f"Steps after it did not run; {record_path.relative_to(cwd)} has the record."
                ) from exc
            entry["state"] = "done"
            entry["seconds"] = round(time.time() - entry["started"], 1)
            outputs[name] = entry["output"]
            record["reports"] += [p for p in entry.get("reports", []) if p]
            _say(
                f"step {index}/{len(steps)} {name}: done in {entry['seconds']} s -> {entry['output']}"
            )
        record["state"] = "succeeded"
    finally:
        kernel.close()
        atomic_write_json(record_path, record)
    return record


def _describe(step: Mapping[str, Any]) -> str:
    if "task" in step:
        return f"task {step['task']}"
    if "check_kept" in step:
        return "kept experts against the recipe's"
    return "gate summary" if "summarize" in step else "decode side by side"


def _run_step(
    step: Mapping[str, Any], *, run_id: str, cwd: Path, outputs: Mapping[str, str],
    notebooks_dir: Path, kernel: _Kernel,
) -> dict[str, Any]:  # fmt: skip
    output = step_output(step, run_id)
    if "task" in step:
        params = resolve_refs(dict(step.get("params", {})), outputs=outputs, cwd=cwd, run_id=run_id)
        params["run_id"] = step_run_id(run_id, step)
        copy = f"{NOTEBOOK_COPY_DIR}/{step_run_id(run_id, step)}.ipynb"
        entry: dict[str, Any] = {"notebook": copy, "output": output}
        kernel.execute(notebooks_dir / step["notebook"], params, cwd / copy)
        reports = [copy]
        if step["task"] == "decode_bench":
            reports.append(f"reports/decode_bench_{params['name']}.md")
        if step["task"] == "validate_expert_math_toy":
            reports.append(output)
        if step["task"].startswith("build_pruned"):
            if not (cwd / output).exists():
                raise StepFailed(f"the build wrote nothing at {output}")
            reports += _build_reports(cwd / output, cwd=cwd)
        return {**entry, "reports": reports}
    if "summarize" in step:
        from versa_runner.errors import VersaRunError
        from versa_runner.parity.noise import gate_summary

        spec = resolve_refs(dict(step["summarize"]), outputs=outputs, cwd=cwd, run_id=run_id)
        try:
            result = gate_summary(
                left_json=cwd / spec["left"], right_json=cwd / spec["right"],
                out_md=cwd / spec["out_md"], gates_json=spec.get("gates_json"),
                noise=[cwd / p for p in spec["noise"]] if spec.get("noise") else None,
                comparison=spec.get("comparison", "parity"),
                allow_informational=bool(spec.get("allow_informational", False)),
            )  # fmt: skip
        except VersaRunError as exc:
            raise StepFailed(f"{exc} ({exc.hint})" if exc.hint else str(exc)) from exc
        _say(result["headline"])
        return {"output": output, "reports": [output], "gate": result}
    if "check_kept" in step:
        return _check_kept(step["check_kept"], cwd=cwd)
    spec = resolve_refs(dict(step["summarize_decode"]), outputs=outputs, cwd=cwd, run_id=run_id)
    from versa_runner.parity.decode import summarize_decode

    result = summarize_decode(cwd / spec["base"], cwd / spec["pruned"], cwd / spec["out_md"])
    _say(result["headline"])
    plots = [str(Path(p).relative_to(cwd)) if Path(p).is_relative_to(cwd) else p
             for p in result.get("plots", [])]  # fmt: skip
    return {"output": output, "reports": [output, *plots], "decode": result}


def _build_reports(output: Path, *, cwd: Path) -> list[str]:
    """The build's markdown report (`reports/build_pruned_<variant>.md`), found through the
    recipe the checkpoint ships (output: the checkpoint, or the index whose out_dir it is)."""
    import yaml

    checkpoint = output
    if output.is_file():  # the index manifest: its primary build
        checkpoint = Path(json.loads(output.read_text(encoding="utf-8")).get("out_dir", ""))
    recipe = checkpoint / "reap-recipe.yaml"
    if not recipe.is_file():
        return []
    name = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("name", "")
    report = Path("reports") / f"build_pruned_{name}.md"
    return [str(report)] if (cwd / report).is_file() else []


def _check_kept(spec: Mapping[str, Any], *, cwd: Path) -> dict[str, Any]:
    """The rebuilt variant kept exactly the experts its recipe records (reproducibility)."""
    import yaml

    manifest = cwd / spec["manifest_json"]
    variants = json.loads(manifest.read_text(encoding="utf-8")).get("variants", {})
    if spec["variant"] not in variants:
        raise StepFailed(
            f"{manifest} names no variant {spec['variant']!r} (built: {sorted(variants)})"
        )
    recipe_path = Path(variants[spec["variant"]]) / "reap-recipe.yaml"
    if not recipe_path.is_absolute():
        recipe_path = cwd / recipe_path
    rebuilt = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    got = rebuilt.get("result", {}).get("keep_experts_by_layer")
    expected = [[int(e) for e in layer] for layer in spec["expected"]]
    differ = [i for i, (a, b) in enumerate(zip(expected, got or [], strict=False)) if a != b]
    if got is None or len(got) != len(expected) or differ:
        raise StepFailed(f"the rebuild of {spec['variant']} kept other experts than its recipe "
                         f"records (layers {differ or 'all'}; {recipe_path})")  # fmt: skip
    _say(f"kept experts of {spec['variant']} match the recipe in all {len(expected)} layers")
    return {"output": str(recipe_path), "reports": [], "kept_match": True}


def main(argv: list[str] | None = None) -> int:
    """`python -m versa_runner.recipes.driver PLAN.json RUN_ID NOTEBOOKS_DIR` (cwd: the job's)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        sys.stderr.write(
            "usage: python -m versa_runner.recipes.driver PLAN.json RUN_ID NOTEBOOKS_DIR\n"
        )
        return 2
    plan = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    # Which copy runs matters on remote targets (the synced code tree, not a stale install).
    _say(f"driver {Path(__file__).resolve().parent}, notebooks {args[2]}, cwd {Path.cwd()}")
    try:
        record = run_plan(plan, run_id=args[1], cwd=Path.cwd(), notebooks_dir=Path(args[2]))
    except StepFailed as exc:
        _say(f"FAILED: {exc}")
        return 1
    _say(f"all {len(record['steps'])} steps done; reports:")
    for path in record["reports"]:
        _say(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
