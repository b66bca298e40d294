"""The 32-expert testbed is what TRAINING.md says, and the quality table's verdicts are strict.

The testbed (kernels/versa_kernels/data/testbed_moe32, scripts/train_testbed_moe.py) must keep
gpt-oss-20b's routing shape, stay under 16 MB, and predict held-out text (sources its training
held out by name hash) far better than a model that ignores its input.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import versa_kernels

REPO = Path(__file__).resolve().parents[1]
TESTBED = Path(versa_kernels.__file__).parent / "data" / "testbed_moe32"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (TESTBED / "config.json").is_file(), reason="testbed not committed")
def test_testbed_has_the_20b_routing_shape_and_predicts_held_out_text() -> None:
    from transformers import AutoTokenizer
    from versa_kernels.eaftreap.evaluate import completion_ppl
    from versa_kernels.eaftreap.profile import prepare_examples
    from versa_kernels.gptoss.model import GptOssModel

    config = json.loads((TESTBED / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (32, 4)
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert sum(p.stat().st_size for p in TESTBED.iterdir() if p.is_file()) <= 16_000_000
    log = json.loads((TESTBED / "train_log.json").read_text())
    assert log["held_out_rule"].startswith("blake2b") and log["val_loss_mxfp4_reloaded"] < 2.0

    sys.path.insert(0, str(REPO / "scripts"))
    corpus = _load("train_corpus", REPO / "scripts" / "train_corpus.py")
    held = [p for p in corpus.train_tiny_moe.stdlib_files()[:200]
            if corpus.held_out(str(p.relative_to(corpus.stdlib_root())))]  # fmt: skip
    rows = [c for p in held for c in corpus.train_tiny_moe.conversations(p, corpus.stdlib_root())]
    assert len(rows) >= 8
    model = GptOssModel.from_checkpoint(TESTBED)
    tokenizer = AutoTokenizer.from_pretrained(TESTBED)
    examples = prepare_examples(rows[:8], tokenizer, max_seq_length=256)
    ppl = completion_ppl(model, examples, batch_size=8, pad_id=int(config["pad_token_id"]))
    # A model that ignored its input would score about the unigram perplexity (hundreds for a
    # 1024-token vocabulary); the trained testbed measured 7.2 on the benchmark's held-out text.
    assert 1.0 < ppl < 15.0, ppl


def test_verdicts_need_separated_seed_ranges() -> None:
    table = _load("quality_table", REPO / "benchmarks" / "quality_table.py")

    def rows(values):
        return [{"seed": i, "dppl": v} for i, v in enumerate(values)]

    assert table.compare(rows([1.0, 1.1, 1.2]), rows([1.3, 1.5, 1.4])) == {
        "wins": 3, "seeds": 3, "clear_win": True, "clear_loss": False,
    }  # fmt: skip
    # Every paired seed won, but the ranges overlap: not a clear win.
    overlap = table.compare(rows([1.0, 1.25, 2.0]), rows([1.2, 1.3, 2.1]))
    assert overlap["wins"] == 3 and not overlap["clear_win"] and not overlap["clear_loss"]
    assert table.compare(rows([2.0, 2.1]), rows([1.0, 1.9]))["clear_loss"]
    gates = {
        "ppl_bound": "min", "max_abs_delta_ppl": 0.25, "max_rel_delta_ppl": 0.05,
        "max_abs_delta_cc_rate": 0.002, "max_abs_delta_mean_prob": 0.02,
    }  # fmt: skip
    row = {"dppl": 0.2, "dcc": 0.001, "dmean_p": -0.01}
    assert table.passes_without_js2d(row, gates, base_ppl=8.0)
    assert not table.passes_without_js2d(row, gates, base_ppl=3.0)  # 5% of 3.0 = 0.15 < 0.2
    assert not table.passes_without_js2d({**row, "dmean_p": -0.03}, gates, base_ppl=8.0)
    assert math.isclose(table.summary(rows([1.0, 2.0, 3.0]), "dppl")["sd"], 1.0)
