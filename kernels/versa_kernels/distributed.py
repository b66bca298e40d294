"""Data-parallel profiling and evaluation over the GPUs of one host (torch.distributed).

Why: one GPU can be too slow for a calibration budget; the same tasks (``build_pruned``
profiling, ``eaft_single``) then spread their batches over N ranks. The notebook stays the
report: with ``gpus > 1`` the task function, running inside the notebook kernel, starts
``python -m torch.distributed.run --standalone --nproc_per_node N -m versa_kernels.distributed
--config cfg.json`` as a subprocess, streams its output into the cell, and reads back rank 0's
return value. A rank that dies fails the whole run with a message naming the rank.

Rules every caller follows (so N ranks give the single-process result):

- Sharding: batch i belongs to rank ``i % N`` (``DistContext.owns``); deterministic, no
  communication, and a resumed rank knows which batches are its own.
- Per-token arrays (p, H, logp) are gathered and re-assembled in batch order
  (``gather_in_order``), so exact quantile thresholds, histograms, float sums and the
  reservoir sample are computed from the same stream as a single process: identical results.
- Per-(layer, expert) float64 accumulators are summed with ``all_reduce`` (``sum_arrays``):
  counts are exact, sums equal a single process within float tolerance (summation order).
- Rank 0 writes every output file; each rank writes only its own resume state
  (``rank_state_path``).

Backend: NCCL with one GPU per rank when CUDA is available; gloo CPU processes otherwise, but
only when ``VERSA_DIST_ALLOW_CPU=1`` says so (tests, benchmarks): a CPU-only target asked for
``--gpus 4`` is an error before any work.

The mode is typed: a function that runs in a rank takes ``dist: DistContext | None`` (None = one
process) and returns the same type either way; ``build_pruned`` itself never runs in a rank
(its ranks run ``eaftreap.build.profile_rank``). Fault injection (a rank dying mid-run) lives in the tests
(tests/dist_faults/), not here.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from versa_kernels.errors import KernelError, ParameterError

log = logging.getLogger(__name__)

MAX_GPUS = 64
ENV_ALLOW_CPU = "VERSA_DIST_ALLOW_CPU"
OUTPUT_TAIL_LINES = 200
COLLECTIVE_TIMEOUT_S = 6 * 3600
"""How long a rank waits in a gather for slower ranks (a resumed rank may have hours left).
A dead rank does not wait this out: torchrun stops every rank as soon as one exits."""
ENTRIES = {
    "build_pruned": "versa_kernels.eaftreap.build:profile_rank",
    "eaft_single": "versa_kernels.eaft.collector:collect",
}
"""What a rank runs for each task; each takes ``dist=DistContext`` besides the task's parameters
and returns one type: ``build_pruned``'s rank only profiles (``profile_rank``, the reduced
profile meta), ``eaft_single``'s rank is ``collect`` itself (the JSON path rank 0 wrote)."""

__all__ = [
    "DistContext",
    "check_gpus",
    "launch",
    "main",
    "rank_state_path",
]


def check_gpus(gpus: int) -> None:
    """Refuse a ``gpus`` value this target cannot run, before any data or model is loaded."""
    import torch

    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= MAX_GPUS:
        raise ParameterError(f"gpus={gpus!r} is not allowed; expected an integer in 1..{MAX_GPUS}")
    if gpus == 1:
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= gpus:
        return
    if have == 0 and os.environ.get(ENV_ALLOW_CPU) == "1":
        return  # N gloo CPU processes, explicitly asked for (tests, benchmarks)
    raise ParameterError(
        f"gpus={gpus} but this target has {have} CUDA GPU(s); expected gpus in 1..{max(have, 1)}",
        hint=f"Lower --gpus (set {ENV_ALLOW_CPU}=1 only to test with gloo CPU processes).",
    )


@dataclass(frozen=True)
class DistContext:
    """This process's place in a multi-rank run; all collective operations go through it."""

    rank: int
    world_size: int
    local_rank: int = 0
    backend: str = "gloo"
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether batch ``index`` is this rank's (round robin: rank r takes r, r+N, ...)."""
        return index % self.world_size == self.rank

    def gather_in_order(self, mine: dict[int, Any]) -> list[Any]:
        """Every rank's ``{batch index: value}`` merged into one list in batch-index order.

        All ranks receive the full list (``all_gather_object``; values are pickled, so pass
        CPU tensors or numpy arrays). Indices must be disjoint across ranks.
        """
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part)
        return [merged[i] for i in sorted(merged)]

    def sum_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Element-wise sum across ranks of float64 arrays (accumulators, histograms)."""
        import torch
        import torch.distributed as dist

        out: dict[str, np.ndarray] = {}
        for name in sorted(arrays):  # same order on every rank
            t = torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float64))
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            out[name] = t.cpu().numpy()
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. rank 0's file is complete)."""
        import torch.distributed as dist

        dist.barrier()

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over all ranks (agreeing on where a resumed run stands)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def rank_state_path(path: Path, dist: DistContext | None) -> Path:
    """Each rank resumes from its own state file; a single process keeps the plain name."""
    if dist is None:
        return path
    return path.with_name(f"{path.stem}.rank{dist.rank}-of-{dist.world_size}{path.suffix}")


# ---- parent side: start torchrun and watch it ---------------------------------------------------

_RANK_RE = re.compile(r"rank\s*:\s*(\d+)")
_EXIT_RE = re.compile(r"exitcode\s*:\s*(-?\d+)")


def _failure_message(entry: str, code: int, tail: Sequence[str]) -> str:
    """torchrun prints a 'Root Cause (first observed failure)' block naming rank and exit code."""
    text = "\n".join(tail)
    root = text.split("Root Cause", 1)[-1]
    rank, exit_code = _RANK_RE.search(root), _EXIT_RE.search(root)
    who = f"rank {rank.group(1)}" if rank else "a rank"
    how = f"exit code {exit_code.group(1)}" if exit_code else f"torchrun exit status {code}"
    return f"distributed {entry} failed: {who} died ({how}); the whole run was stopped"


def launch(entry: str, params: dict[str, Any], gpus: int) -> Any:
    """Run ``ENTRIES[entry](**params)`` on ``gpus`` ranks via torchrun; returns rank 0's value.

    Output of every rank is streamed to this process's stdout (the notebook cell) as it comes.
    Raises ``KernelError`` naming the failed rank when any rank dies.
    """
    if entry not in ENTRIES:
        raise ParameterError(f"entry={entry!r} is not one of {', '.join(ENTRIES)}")
    check_gpus(gpus)
    with tempfile.TemporaryDirectory(prefix="versa_dist_") as tmp:
        cfg, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        cfg.write_text(json.dumps({"entry": entry, "params": params, "result_file": str(result)}))
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={gpus}", "-m", "versa_kernels.distributed", "--config", str(cfg),
        ]  # fmt: skip
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # N processes must not each take every core
        log.info("starting %d ranks: %s", gpus, " ".join(cmd))
        tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)  # into the notebook cell, live
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        code = proc.wait()
        if code != 0:
            raise KernelError(
                _failure_message(entry, code, tail),
                hint="Read that rank's output above; re-running resumes from the saved state.",
            )
        return json.loads(result.read_text())["value"] if result.is_file() else None


# ---- worker side: one rank -----------------------------------------------------------------


def _init() -> DistContext:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)  # one GPU per rank
        backend, device = "nccl", f"cuda:{local}"
    else:
        backend, device = "gloo", "cpu"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return DistContext(rank, world, local, backend, device)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun's entry point: run the configured task function on this rank."""
    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON: entry, params, result_file")
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    ctx = _init()
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {ctx.rank}] %(asctime)s %(name)s %(message)s"
    )
    module, name = ENTRIES[cfg["entry"]].split(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        value = fn(**cfg["params"], dist=ctx)
        dist.barrier()  # rank 0's files are complete before anyone reports success
    finally:
        dist.destroy_process_group()
    if ctx.is_main:
        Path(cfg["result_file"]).write_text(json.dumps({"value": _jsonable(value)}))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: a rank then has one
    # DistContext class, the one every task function and test sees.
    from versa_kernels.distributed import main as _main

    sys.exit(_main())
