"""Data-parallel scaling of eaft_single and build_pruned profiling: tokens/s on 1, 2, 4 ranks.

Each rank count, 1 included, starts the real task function on N torchrun ranks
(``versa_kernels.distributed.launch``, what a notebook cell does with ``gpus=N``) on the same
model, packs and blocks, so every count starts equally cold. The throughput is the one the task
itself records, so process start-up and model loading are not counted:

- eaft_single: sum of ``predicted_tokens`` over every (pack, seq) entry / sum of ``pack_wall_s``
  (rank 0's wall time of the forward loop plus the gather of the per-token signals);
- build_pruned: ``profile_meta.tokens_per_s`` (both passes, all ranks together).

Scaling efficiency = tokens/s with N ranks / (N x tokens/s with 1 rank).

On a multi-GPU host (NCCL, one GPU per rank):

    python benchmarks/bench_scaling.py --model-path /path/to/gpt-oss-20b \\
        --pack-files a.parquet,b.parquet --ranks 1,2,4 --json-out scaling.json

Without ``--model-path`` it uses the tiny fixture model and packs (a smoke run); on a CPU-only
host pass ``--allow-cpu`` to run gloo CPU processes (numbers are then CPU-only, not GPU ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def eaft_tokens_per_s(model: str, packs: list[str], ranks: int, args: Any, out: Path) -> float:
    from versa_kernels.distributed import launch

    path = launch("eaft_single", dict(
        model_id="bench/scaling", model_path=model, calib_pack_files=packs,
        seq_lens_csv=args.seq_len, num_blocks=args.num_blocks, batch_size=args.batch_size,
        sample_points=1000, top_k=args.top_k, run_id=f"ranks{ranks}", out_root=str(out),
    ), ranks)  # fmt: skip
    doc = json.loads(Path(path).read_text())
    entries = [e for pack in doc["packs"] for e in pack["seq"].values()]
    return sum(e["model"]["predicted_tokens"] for e in entries) / sum(
        e["pack_wall_s"] for e in entries
    )


def profile_tokens_per_s(model: str, packs: list[str], ranks: int, args: Any, out: Path) -> float:
    from versa_kernels.distributed import launch

    where = out / f"build_ranks{ranks}"  # a rank profiles and returns its profile meta
    meta = launch("build_pruned", dict(
        model_path=model, calib_pack_files=packs, num_rows=args.num_rows,
        max_seq_length=args.max_seq_length, batch_size=args.batch_size, keep_frac=0.75,
        core_pos_top_m=1, keep_n_multiple_of=1, artifacts_dir=str(where / "art"),
        reports_dir=str(where / "reports"), out_dir=str(where / "out"),
    ), ranks)  # fmt: skip
    return float(meta["tokens_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="", help="checkpoint dir (default: tiny fixture)")
    parser.add_argument("--pack-files", default="", help="comma-separated parquet packs")
    parser.add_argument("--ranks", default="1,2,4", help="rank counts to measure")
    parser.add_argument("--tasks", default="eaft_single,build_pruned")
    parser.add_argument("--num-blocks", type=int, default=16, help="eaft_single blocks per seq")
    parser.add_argument("--seq-len", default="256", help="eaft_single block length")
    parser.add_argument("--num-rows", type=int, default=16, help="build_pruned calibration rows")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--allow-cpu", action="store_true", help="gloo CPU ranks (no GPU)")
    parser.add_argument("--json-out", default="")
    args = parser.parse_args(argv)
    if args.allow_cpu:
        os.environ["VERSA_DIST_ALLOW_CPU"] = "1"
    import torch

    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        out = Path(tmp)
        model, packs = args.model_path, [p for p in args.pack_files.split(",") if p]
        if not model:
            from versa_kernels.fixtures import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(out / "model", layers=4, experts=8, top_k=4))
        if not packs:
            from versa_kernels.fixtures import make_calib_packs

            packs = [str(p) for p in make_calib_packs(out / "packs", rows=64)]
        measure = {"eaft_single": eaft_tokens_per_s, "build_pruned": profile_tokens_per_s}
        results: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "backend": "nccl" if torch.cuda.is_available() else "gloo",
            "model_path": args.model_path or "tiny fixture",
            "tasks": {},
        }
        for task in args.tasks.split(","):
            rows = []
            for n in ranks:
                tps = measure[task](model, packs, n, args, out / task)
                rows.append({"ranks": n, "tokens_per_s": tps})
            base = next((r["tokens_per_s"] for r in rows if r["ranks"] == 1), None)
            for r in rows:
                r["efficiency"] = r["tokens_per_s"] / (r["ranks"] * base) if base else None
            results["tasks"][task] = rows
    text = json.dumps(results, indent=2)
    sys.stdout.write(text + "\n")
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    for task, rows in results["tasks"].items():
        for r in rows:
            eff = "n/a" if r["efficiency"] is None else f"{100 * r['efficiency']:.0f}%"
            sys.stdout.write(
                f"{task:13s} ranks={r['ranks']:<2d} {r['tokens_per_s']:10.0f} tok/s  "
                f"efficiency {eff}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
