"""On the trained tiny MoE: a 25% EAFT-REAP prune moves the parity metrics less than random ones.

The model (kernels/versa_kernels/data/tiny_moe_trained, scripts/train_tiny_moe.py) was trained
on Python stdlib sources and Harmony conversations built from them, so its experts specialize.
Calibration (profiling) rows come from training-side modules; the evaluation packs from the
held-out modules (every VAL_EVERY-th file), so the comparison is on text the ranking never saw.
All candidates are collected with `eaft.collect` (experts physically sliced at load) on the
same blocks and compared with `versa_runner.parity.summarize.compare_runs`, as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import versa_kernels
from versa_kernels.eaft import UNION_PACK, collect

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(versa_kernels.__file__).parent / "data" / "tiny_moe_trained"
KEEP_FRAC = 0.75
SEQ = "256"  # the length the model was trained at
NUM_BLOCKS = 4
CALIB_ROWS = 24
EVAL_ROWS_PER_PACK = 40
RANDOM_SEEDS = (0, 1, 2)

pytestmark = pytest.mark.skipif(
    not (MODEL / "config.json").is_file(), reason="trained tiny MoE not present (H3 commits it)"
)


def _train_script():
    spec = importlib.util.spec_from_file_location(
        "train_tiny_moe", REPO / "scripts" / "train_tiny_moe.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tiny_moe", module)
    spec.loader.exec_module(module)
    return module


def _write_pack(path: Path, texts: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)
    return str(path)


def _conversations(train, files, root, limit, *, kind):
    """Docstring Q&A ("explain") or source listings ("source") from `files`, in file order."""
    out = []
    for path in files:
        for text in train.conversations(path, root):
            is_source = "is implemented" in text
            if (kind == "source") == is_source:
                out.append(text)
        if len(out) >= limit:
            break
    return out[:limit]


def _eaftreap_keep(model_dir: Path, calib: list[str], keep_n: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    from versa_kernels.eaftreap.profile import prepare_examples, profile_experts
    from versa_kernels.gptoss.model import GptOssModel

    model = GptOssModel.from_checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = prepare_examples(calib, tokenizer, max_seq_length=256)
    result = profile_experts(
        model, examples, num_layers=model.config.num_hidden_layers,
        num_experts=max(model.experts_per_layer), batch_size=8,
        pad_id=int(model.config.pad_token_id or 0),
    )  # fmt: skip
    scores = result.acc.score("eaft_gate_norm_sum")  # [L, E]
    return [sorted(np.argsort(-row, kind="stable")[:keep_n].tolist()) for row in scores]


def test_eaftreap_prune_beats_random_prune(tmp_path):
    from versa_runner.parity.summarize import compare_runs, load_eaft_json, load_gates

    train = _train_script()
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = train.stdlib_files()
    held_out = files[:: train.VAL_EVERY]
    train_side = [p for i, p in enumerate(files) if i % train.VAL_EVERY][::7]
    calib = _conversations(train, train_side, root, CALIB_ROWS // 2, kind="explain")
    calib += _conversations(train, train_side, root, CALIB_ROWS // 2, kind="source")
    packs = [
        _write_pack(tmp_path / "packs" / "explain.parquet",
                    _conversations(train, held_out, root, EVAL_ROWS_PER_PACK, kind="explain")),
        _write_pack(tmp_path / "packs" / "source.parquet",
                    _conversations(train, held_out[1::2], root, EVAL_ROWS_PER_PACK, kind="source")),
    ]  # fmt: skip
    config = json.loads((MODEL / "config.json").read_text())
    experts, layers = config["num_local_experts"], config["num_hidden_layers"]
    keep_n = round(KEEP_FRAC * experts)
    candidates = {"eaftreap": _eaftreap_keep(MODEL, calib, keep_n)}
    for seed in RANDOM_SEEDS:
        rng = np.random.default_rng(seed)
        candidates[f"random{seed}"] = [
            sorted(rng.choice(experts, keep_n, replace=False).tolist()) for _ in range(layers)
        ]

    def run(name, keep):
        path = collect(
            model_id=f"tiny/{name}", model_path=str(MODEL), calib_pack_files=packs,
            seq_lens_csv=SEQ, num_blocks=NUM_BLOCKS, sample_points=0, top_k=config["num_experts_per_tok"],
            run_id="parity", out_root=str(tmp_path / "out"), experts_keep=keep,
        )  # fmt: skip
        return load_eaft_json(path, param=name)

    gates_doc = json.loads(Path(load_gates().path).read_text())
    gates_doc["primary_seq_lens"] = [SEQ]
    (tmp_path / "gates.json").write_text(json.dumps(gates_doc))
    gates = load_gates(tmp_path / "gates.json")
    base = run("base", None)
    rows = {}
    for name, keep in candidates.items():
        summary = compare_runs(base, run(name, keep), gates)
        rows[name] = next(r for r in summary.rows if r.pack == UNION_PACK)
    eaft = rows["eaftreap"]
    randoms = [rows[f"random{s}"] for s in RANDOM_SEEDS]
    report = {
        n: (round(r.ppl_left, 3), round(r.delta_ppl, 3), round(r.delta_mean_p, 4), round(r.js2d, 4))
        for n, r in rows.items()
    }
    print("UNION base PPL, dPPL, dmean_p, JS2D:", report)
    assert eaft.delta_ppl < np.mean([r.delta_ppl for r in randoms]), report
    assert abs(eaft.delta_ppl) < min(abs(r.delta_ppl) for r in randoms), report
    assert eaft.js2d < np.mean([r.js2d for r in randoms]), report
    assert abs(eaft.delta_mean_p) < np.mean([abs(r.delta_mean_p) for r in randoms]), report
