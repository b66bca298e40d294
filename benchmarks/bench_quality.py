"""Held-out pruning quality: EAFT-REAP against REAP, frequency, EAN and random, side by side.

For each calibration seed the calibration rows are sampled (``packs.load_packs``) from a pool of
Harmony conversations about sources the model never trained on, and profiled once
(``profile.profile_experts``); every method is a ranking key of that one profile
(``scoring.SCORE_KEYS``), allocated by ``allocation`` exactly as ``build_pruned`` does
(``check_feasible`` -> ``budget_keep_counts`` on the routing counts -> ``select_experts`` by the
key).
Each kept set is evaluated by ``eaft.collect_blocks`` with the forward's router mask (equal to
slicing the experts out, tests/test_eaftreap_rewrite.py) on evaluation blocks cut from *other*
held-out sources, and compared with the unpruned model by ``versa_runner.parity.summarize.compare_runs``
under the near-lossless-v1 gate (primary seq = the block length).

Methods: eaft-reap = ``eaft_gate_norm_sum`` (the build's default); reap = ``saliency_mean``
(REAP's mean g*||f|| per routed token); frequency = ``count``; ean = ``norm_mean`` (mean
||f|| per routed token, no gate); random = a uniform draw per layer (seeded by the calibration
seed) with EAFT-REAP's per-layer counts. Spread = min..max over the calibration seeds; a method
"clearly" beats another when its worst seed is better than the other's best seed.

    python benchmarks/bench_quality.py --model tiny              # CPU, ~1 min on one core
    python benchmarks/bench_quality.py --model testbed --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from versa_kernels.eaftreap.scoring import EaftWeights
from versa_kernels.signals import W_GOOD, W_UNCERTAIN

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_table  # noqa: E402

log = logging.getLogger("bench_quality")

DATA = REPO / "kernels/versa_kernels/data"
MODELS = {"tiny": DATA / "tiny_moe_trained", "testbed": DATA / "testbed_moe32"}
METHODS = {
    "eaft-reap": "eaft_gate_norm_sum",
    "reap": "saliency_mean",
    "frequency": "count",
    "ean": "norm_mean",
    "random": None,
}
# Candidates: "<ranking key>" or "<ranking key>|<budget mass key>|<budget rule>" (rule neff =
# allocation.budget_keep_counts, share = allocation.share_keep_counts; the build budgets by the
# neff of ``count``); a suffix "@<u>" or "@<g>,<u>" profiles with EAFT weights g for good and u
# for uncertain tokens instead of 1.0 and 0.25 (confident conflicts keep -2.0).
EXTRA_METHODS = {
    "reap-total": "gate_norm_sum",  # REAP mass, not its per-token mean: EAFT-REAP unweighted
    "eaft-reap-u1": "eaft_gate_norm_sum@1.0",  # EAFT-REAP, uncertain tokens at full weight
    "eaft-reap-hard": "eaft_gate_norm_sum@0.25,1.0",  # good tokens down-weighted instead
    "eaft-reap-mean": "eaft_saliency_mean",  # per-hit mean of the EAFT-weighted score
    # The per-layer budgets before this benchmark: the neff of the ranking key's own mass.
    "eaft-reap/score-neff": "eaft_gate_norm_sum|eaft_gate_norm_sum|neff",
    "reap-total/score-neff": "gate_norm_sum|gate_norm_sum|neff",
    # DiEP-style: one global ranking of each expert's share of its layer's mass.
    "eaft-reap/share": "eaft_gate_norm_sum|eaft_gate_norm_sum|share",
    "eaft-reap/count-share": "eaft_gate_norm_sum|count|share",
}
BUDGET_KEY = "count"  # what eaftreap.recut budgets per-layer keeps by
KEEP_FRACS = (0.875, 0.75, 0.625, 0.5)
LAYOUTS = ("uniform", "per-layer")
# Per model: calibration rows, evaluation blocks, block length (= the training length).
SIZES = {"tiny": (48, 24, 256), "testbed": (128, 64, 256)}


def held_out_rows(
    model_dir: Path, calib_source: str = "held-out"
) -> tuple[list[str], list[str], dict[str, Any]]:
    """(calibration pool, evaluation rows, provenance): conversations about held-out sources,
    split by source so that no source gives rows to both. ``calib_source="trained"`` takes the
    calibration pool from sources the model trained on instead (text it has seen, as a user's
    calibration set may be); the evaluation rows stay the same."""
    import train_corpus

    log_path = model_dir / "train_log.json"
    train_log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    if "held_out_rule" in train_log:  # the testbed: hash-held-out files and reference topics
        sources = train_corpus.stdlib_sources()
        held = [s for s in sources if train_corpus.held_out(s.name)]
        trained = [s for s in sources if not train_corpus.held_out(s.name)]
        rule = train_log["held_out_rule"]
    else:  # the tiny model: every VAL_EVERY-th stdlib file
        held = train_corpus.tiny_held_out()
        trained = train_corpus.tiny_trained() if calib_source == "trained" else []
        rule = "tiny: every 20th sorted stdlib file"
    trained_on = train_log.get("python")
    if trained_on and trained_on.rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        log.warning("model trained on Python %s's stdlib, this is %s: the held-out rule "
                    "(by name) still holds, but the set of sources differs", trained_on, platform.python_version())  # fmt: skip
    eval_src = [s for s in held if train_corpus.eval_side(s.name)]
    calib_src = [s for s in held if not train_corpus.eval_side(s.name)]
    if calib_source == "trained":  # every 8th trained source, by name: a pool of similar size
        calib_src = [s for s in trained if train_corpus.eval_side(s.name)][::8]
    # Interleave each source's conversations so blocks mix explain/source/topic rows.
    eval_rows = [c for s in eval_src for c in s.conversations]
    calib_rows = [c for s in calib_src for c in s.conversations]
    info = {
        "held_out_rule": rule,
        "calib_source": calib_source,
        "python": platform.python_version(),
        "eval_sources": len(eval_src),
        "calib_sources": len(calib_src),
        "eval_rows_available": len(eval_rows),
        "calib_pool_rows": len(calib_rows),
        "shared_sources": len({s.name for s in eval_src} & {s.name for s in calib_src}),
    }
    return calib_rows, eval_rows, info


def _write_pool(path: Path, rows: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": rows}), path)
    return path


def _doc(entry: dict[str, Any], seq: str, spec: Any) -> dict[str, Any]:
    """A one-row collector JSON (what compare_runs reads) around one collect_blocks entry."""
    from versa_kernels.eaft import UNION_PACK

    meta = {"entropy_topk": 20, "hist_xbins": spec.xbins, "hist_ybins": spec.ybins,
            "prob_scale": spec.prob_scale, "x_min": spec.x_range[0], "x_max": spec.x_range[1],
            "cc_quantile": 0.15}  # fmt: skip
    return {"schema_version": 1, "meta": meta, "packs": [{"pack": UNION_PACK, "seq": {seq: entry}}]}


class Evaluator:
    """Held-out gate metrics of kept sets against the unpruned model (cached by kept set)."""

    def __init__(self, model: Any, blocks: Any, seq: str, batch_size: int) -> None:
        from versa_kernels.eaft.stats import HistogramSpec

        from versa_runner.parity.gates import load_gates

        self.model, self.blocks, self.seq, self.batch_size = model, blocks, seq, batch_size
        self.spec = HistogramSpec()
        # near-lossless-v1's limits; its hero row is the one block length evaluated here.
        self.gates = dataclasses.replace(load_gates(), primary_seq_lens=(seq,))
        self.base = self._entry(None)
        self.cache: dict[tuple, dict[str, Any]] = {}

    def _entry(self, kept: list[list[int]] | None) -> dict[str, Any]:
        from versa_kernels.eaft.collector import collect_blocks
        from versa_kernels.eaftreap.evaluate import keep_masks

        mask = None
        if kept is not None:
            dev = next(self.model.parameters()).device
            mask = [m.to(dev) for m in keep_masks(kept, self.model.experts_per_layer)]
        return collect_blocks(
            self.model, self.blocks, batch_size=self.batch_size, spec=self.spec, router_mask=mask
        )

    def metrics(self, kept: list[list[int]]) -> dict[str, Any]:
        from versa_runner.parity.summarize import compare_runs

        key = tuple(tuple(k) for k in kept)
        if key not in self.cache:
            entry = self._entry(kept)
            s = compare_runs(
                _doc(self.base, self.seq, self.spec), _doc(entry, self.seq, self.spec), self.gates
            )
            row = s.rows[0]
            self.cache[key] = {
                "ppl": row.ppl_right, "dppl": row.delta_ppl, "dcc": row.delta_cc,
                "dmean_p": row.delta_mean_p, "js2d": row.js2d, "gate_pass": s.passed,
            }  # fmt: skip
        return self.cache[key]


def class_weights(method: str) -> tuple[float, float]:
    """(w_good, w_uncertain) a method spec profiles with (its "@" suffix, else the defaults)."""
    suffix = method.partition("@")[2]
    values = [float(v) for v in suffix.split(",")] if suffix else []
    return (W_GOOD, *values) if len(values) == 1 else tuple(values) or (W_GOOD, W_UNCERTAIN)


def allocate(method: str, profs: dict[tuple, Any], plan: Any, core: int) -> list[list[int]]:
    """Kept ids per layer for one method spec, as build_pruned allocates them (module doc)."""
    from versa_kernels.eaftreap.allocation import (
        budget_keep_counts,
        core_experts,
        select_experts,
        share_keep_counts,
    )

    prof = profs[class_weights(method)]
    method = method.partition("@")[0]
    rank_key, budget_key, rule = (method.split("|") + ["", ""])[:3]
    scores = prof.acc.score(rank_key)
    mass = np.clip(prof.acc.score(budget_key or BUDGET_KEY), 0.0, None)
    if rule == "share":
        counts = share_keep_counts(mass, plan)
    else:
        counts, _ = budget_keep_counts(mass, plan)
    cores = core_experts(prof.acc.pos_gate_norm_sum, prof.acc.count, pos_top_m=core, count_top_m=0)
    return select_experts(scores, counts, cores)


def random_kept(counts: list[int], num_experts: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(10_000 + seed)
    return [sorted(int(e) for e in rng.choice(num_experts, size=n, replace=False)) for n in counts]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from versa_kernels.eaft import UNION_PACK
    from versa_kernels.eaft.blocks import TokenCache, pack_blocks
    from versa_kernels.eaftreap.allocation import check_feasible
    from versa_kernels.eaftreap.profile import prepare_examples, profile_experts
    from versa_kernels.gptoss.model import GptOssModel
    from versa_kernels.packs import load_packs

    started = time.monotonic()
    model_dir = MODELS.get(args.model, Path(args.model))
    calib_rows, eval_rows, data_info = held_out_rows(model_dir, args.calib_source)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = GptOssModel.from_checkpoint(model_dir, dtype=dtype, device=dev)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    L, E, K = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    pad_id = cfg.pad_token_id if isinstance(cfg.pad_token_id, int) else 0
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    blocks = pack_blocks(eval_rows, TokenCache(tokenizer), seq_len=args.seq_len,
                         num_blocks=args.eval_blocks, eos_id=int(eos), pack=UNION_PACK)  # fmt: skip
    ev = Evaluator(model, blocks, str(args.seq_len), args.batch_size)
    base = ev.base["model"]
    log.info("base: PPL %.4f over %d held-out completion tokens", base["ppl"], base["kept_tokens"])
    pool = _write_pool(
        Path(tempfile.mkdtemp(prefix="bench_quality_")) / "calib_pool.parquet", calib_rows
    )
    methods = {m: METHODS[m] for m in args.methods}
    methods.update({m: EXTRA_METHODS[m] for m in args.extra_methods})
    results: list[dict[str, Any]] = []
    profiles = []
    for seed in args.seeds:
        sample = load_packs([pool], num_rows=args.calib_rows, seed=seed, strategy="per_file")
        examples = prepare_examples([r.text for r in sample.rows], tokenizer,
                                    max_seq_length=args.seq_len)  # fmt: skip
        profs = {
            w: profile_experts(model, examples, num_layers=L, num_experts=E,
                               batch_size=args.batch_size, pad_id=pad_id,
                               weights=EaftWeights(w_good=w[0], w_uncertain=w[1]))
            for w in sorted({class_weights(k) for k in methods.values() if k is not None})
        }  # fmt: skip
        default = (W_GOOD, W_UNCERTAIN)
        prof = profs[default] if default in profs else next(iter(profs.values()))
        profiles.append({"seed": seed, "scored_tokens": prof.scored_tokens,
                         "rows_sha256": sample.rows_sha256, **prof.region_counts})  # fmt: skip
        for layout in args.layouts:
            for kf in args.keep_fracs:
                plan = check_feasible(num_layers=L, num_experts=E, top_k=K, keep_frac=kf,
                                      layout=layout, core_pos_top_m=args.core,
                                      keep_n_multiple_of=1)  # fmt: skip
                kept_by = {m: allocate(k, profs, plan, args.core)
                           for m, k in methods.items()
                           if k is not None and (layout != "uniform" or "|" not in k)}  # fmt: skip
                if "random" in methods:
                    counts = [len(k) for k in kept_by["eaft-reap"]]
                    kept_by["random"] = random_kept(counts, E, seed)
                for method, kept in kept_by.items():
                    m = ev.metrics(kept)
                    results.append({"seed": seed, "layout": layout, "keep_frac": kf,
                                    "method": method, "kept_experts": sum(map(len, kept)),
                                    "counts": [len(k) for k in kept], **m})  # fmt: skip
                log.info("seed %d %s %.3f: %s", seed, layout, kf, "  ".join(
                    f"{r['method']} {r['dppl']:+.3f}" for r in results[-len(kept_by):]))  # fmt: skip
    return {
        "schema_version": 1,
        "command": " ".join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]]),
        "model": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir),
        "shape": {"layers": L, "experts": E, "top_k": K},
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "report")},
            "keep_n_multiple_of": 1,
            "eval_tokens": base["kept_tokens"],
        },  # fmt: skip
        "data": data_info,
        "gates": dataclasses.asdict(ev.gates),
        "base": {k: base[k] for k in ("ppl", "cc_rate", "mean_prob", "kept_tokens")},
        "profiles": profiles,
        "results": results,
        "evaluations": len(ev.cache),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, testbed or a checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (CSV, >= 1)")
    parser.add_argument("--keep-fracs", default=",".join(map(str, KEEP_FRACS)))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--methods", default=",".join(METHODS), help="CSV, subset of the default")
    parser.add_argument("--extra-methods", default="", help=f"CSV of {', '.join(EXTRA_METHODS)}")
    parser.add_argument("--calib-rows", type=int, default=0, help="0 = the model's default")
    parser.add_argument("--eval-blocks", type=int, default=0, help="0 = the model's default")
    parser.add_argument("--seq-len", type=int, default=0, help="0 = the model's default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib-source", default="held-out", choices=("held-out", "trained"),
                        help="calibration pool: held-out sources (default) or trained-on ones")  # fmt: skip
    parser.add_argument("--core", type=int, default=0, help="safety core (core_pos_top_m)")
    parser.add_argument("--out", default="", help="results JSON (default: print only)")
    parser.add_argument("--report", default="", help="markdown report path")
    args = parser.parse_args()
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.keep_fracs = [float(k) for k in args.keep_fracs.split(",") if k.strip()]
    except ValueError:
        parser.error("--seeds must be integers and --keep-fracs numbers, comma separated")
    args.layouts = [x for x in args.layouts.split(",") if x]
    args.extra_methods = [x for x in args.extra_methods.split(",") if x]
    args.methods = [x for x in args.methods.split(",") if x]
    if bad := [x for x in args.methods if x not in METHODS]:
        parser.error(f"--methods: {bad} not in {', '.join(METHODS)}")
    if "random" in args.methods and "eaft-reap" not in args.methods:
        parser.error("--methods: random takes EAFT-REAP's per-layer counts; list eaft-reap too")
    if not args.seeds or not args.keep_fracs or any(not 0 < k <= 1 for k in args.keep_fracs):
        parser.error("--seeds needs one seed or more; --keep-fracs values must be in (0, 1]")
    if bad := [x for x in args.layouts if x not in LAYOUTS]:
        parser.error(f"--layouts: {bad} not in {', '.join(LAYOUTS)}")
    if bad := [x for x in args.extra_methods if x not in EXTRA_METHODS]:
        parser.error(f"--extra-methods: {bad} not in {', '.join(EXTRA_METHODS)}")
    size = SIZES.get(args.model, SIZES["testbed"])
    args.calib_rows = args.calib_rows or size[0]
    args.eval_blocks = args.eval_blocks or size[1]
    args.seq_len = args.seq_len or size[2]
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("versa_kernels").setLevel(logging.WARNING)
    from versa_runner.fsutil import atomic_write_text

    result = run(args)
    text = quality_table.report(result)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=1))
    if args.report:
        atomic_write_text(Path(args.report), text)


if __name__ == "__main__":
    main()
