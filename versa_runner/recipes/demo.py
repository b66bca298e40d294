"""`versa-run demo`: the seed playbook on this machine with the trained tiny model (16 experts,
4 layers) and generated Harmony packs, and what it shows.

Inputs go under the output dir (`models/base`, `packs/`), where the demo recipe
(`recipes/tiny/playbook-tiny_demo.yaml`) names them by relative path; the job's working
directory on the local target is the output dir. Two prunes are built: a light one (profiled)
and a heavy one re-cut from the light one's `reap-scores.yaml` (no forward). `demo_summary`
reads the playbook's record and reports: the gate table with the noise floor beside it, light
against heavy (does the gate tell them apart at this scale?), and the path of every report.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO_ROOT / "recipes" / "tiny" / "playbook-tiny_demo.yaml"
DEMO_PLAN_NAME = "tiny_demo"  # `name` of the demo recipe, and so of its playbook records
DEMO_PACK_ROWS = 192  # enough tokens for 2 x num_blocks blocks of 2048 tokens in every pack
CHECKS = (("ppl", "|ΔPPL|", 1.0), ("cc", "|ΔCC| pp", 100.0), ("mean_p", "|Δmean_p|", 1.0),
          ("js2d", "JS2D", 1.0))  # fmt: skip

__all__ = ["DEMO_RECIPE", "demo_summary", "prepare_demo_inputs", "tells_apart"]


def prepare_demo_inputs(output_dir: Path, *, log: IO[str]) -> None:
    """Copy the trained tiny model to models/base and write the packs (idempotent)."""
    fixtures = importlib.import_module("versa_kernels.fixtures.cli").main  # GPU-side package

    base = output_dir / "models" / "base"
    if not (base / "config.json").is_file():
        if fixtures(["model", str(base), "--trained", "--overwrite"], out=log, err=log) != 0:
            raise RuntimeError(f"could not write the tiny model: {log}")
    packs = output_dir / "packs"
    if not (packs / "tool_agentic_10k_v6.parquet").is_file():
        fixtures(["packs", str(packs), "--rows", str(DEMO_PACK_ROWS)], out=log, err=log)


def _latest_record(output_dir: Path, name: str = DEMO_PLAN_NAME) -> dict[str, Any] | None:
    """The newest playbook record of the demo's plan (other recipes may share the dir)."""
    paths = sorted(
        (output_dir / "reports").glob("playbook_*.json"), key=lambda p: p.stat().st_mtime
    )
    records = [
        json.loads(p.read_text(encoding="utf-8"))
        for p in paths
        if not p.name.endswith("_plan.json")
    ]
    records = [r for r in records if r.get("name") == name]
    return records[-1] if records else None


def _noise_by_check(gate: dict[str, Any]) -> dict[tuple[str, str], float]:
    return {(n["seq"], n["check"]): max(v for v in (n["measured"], n["sampling"], 0.0) if v is not None)
            for n in gate["noise"]}  # fmt: skip


def tells_apart(light: dict[str, Any], heavy: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the gate separates two prunes: different verdicts, or a check whose values
    differ by more than the noise level of that check at this sample size."""
    noise = _noise_by_check(light)
    value = {(n["seq"], n["check"]): n["value"] for n in light["noise"]}
    reasons = []
    for n in heavy["noise"]:
        key = (n["seq"], n["check"])
        gap = abs(n["value"] - value.get(key, 0.0))
        if gap > noise.get(key, 0.0):
            reasons.append(f"seq={key[0]} {key[1]}: {gap:.4g} apart > noise {noise[key]:.4g}")
    if light["verdict"] != heavy["verdict"]:
        reasons.insert(0, f"verdicts differ ({light['verdict']} vs {heavy['verdict']})")
    return bool(reasons), reasons


def demo_summary(output_dir: Path, *, elapsed_s: float) -> str:
    """The demo's closing text: gate table beside the noise floor, light vs heavy, reports."""
    record = _latest_record(output_dir)
    if record is None:
        return "demo: no playbook record was written (see the log above)."
    gates = {s["name"]: s["gate"] for s in record["steps"] if "gate" in s}
    lines = ["", f"== demo: {record['state']} in {elapsed_s:.0f} s (run {record['run_id']}) =="]
    noise = gates.get("gate_noise")
    if noise:
        lines += ["", f"noise floor (base vs base, disjoint blocks): the gate says {noise['verdict']} "
                  "on pure noise"]  # fmt: skip
    header = (
        f"{'model':<8} {'seq':>5} "
        + " ".join(f"{label:>18}" for _, label, _ in CHECKS)
        + "  verdict"
    )
    lines += ["", "gate near-lossless-v1, value (noise level) per check:", header]
    for name, gate in gates.items():  # gate_noise first: its values are the noise itself
        by = {(n["seq"], n["check"]): n for n in gate["noise"]}
        for seq in sorted({n["seq"] for n in gate["noise"]}, key=int):
            cells = []
            for check, _, scale in CHECKS:
                n = by[(seq, check)]
                level = max(v for v in (n["measured"], n["sampling"], 0.0) if v is not None)
                flag = "!" if n["threshold_below_noise"] else " "
                cells.append(f"{n['value'] * scale:>8.4f} ({level * scale:.4f}){flag}")
            lines.append(f"{name.removeprefix('gate_'):<8} {seq:>5} " + " ".join(f"{c:>18}" for c in cells)
                         + f"  {gate['verdict']}")  # fmt: skip
    lines.append("(! : the threshold sits below the noise at this sample size)")
    if "gate_light" in gates and "gate_heavy" in gates:
        light, heavy = gates["gate_light"], gates["gate_heavy"]
        apart, reasons = tells_apart(light, heavy)
        same = light["verdict"] == heavy["verdict"]
        verdicts = f"verdicts light {light['verdict']}, heavy {heavy['verdict']}"
        if apart and same:
            text = (
                f"the verdict does not separate them ({verdicts}); its checks do, beyond the noise:"
            )
        elif apart:
            text = f"the gate TELLS THEM APART ({verdicts}):"
        else:
            text = f"the gate does NOT tell them apart ({verdicts}; every difference is within the noise)"
        lines += ["", "light (keep 0.75) vs heavy (keep 0.25) prune at this scale: " + text]
        lines += [f"  - {r}" for r in reasons if not r.startswith("verdicts differ")]
    lines += ["", "reports:"] + [f"  {output_dir / p}" for p in record["reports"]]
    lines.append(f"  {output_dir / 'reports' / ('playbook_' + record['run_id'] + '.json')}")
    return "\n".join(lines)
