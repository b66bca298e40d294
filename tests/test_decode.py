"""The native KV-cache decode engine and the decode_bench task's library function."""

from __future__ import annotations

import json

import pytest
import torch
from versa_kernels.bench import pick_engine, run_decode_bench
from versa_kernels.decode import greedy_generate, greedy_reference, prefill
from versa_kernels.errors import ParameterError
from versa_kernels.fixtures.model import make_tiny_checkpoint
from versa_kernels.gptoss.model import GptOssModel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    # sliding_window=4 with 7 prompt + 10 new tokens: the window cache is trimmed many times.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("decode") / "m", seed=3, layers=3)


def test_cached_decode_equals_full_forward(tiny_dir) -> None:
    model = GptOssModel.from_checkpoint(tiny_dir)
    ids = torch.randint(
        0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1)
    )
    cached = greedy_generate(model, ids, 10)
    assert torch.equal(cached, greedy_reference(model, ids, 10))
    # Logits of the prefill equal the full forward's last-position logits.
    logits, cache = prefill(model, ids)
    full = model.logits(model(ids).hidden[:, -1])
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 7


def test_window_cache_is_trimmed(tiny_dir) -> None:
    model = GptOssModel.from_checkpoint(tiny_dir)
    _, cache = prefill(model, torch.arange(20)[None, :])
    window = model.config.sliding_window
    for layer, kind in enumerate(model.config.layer_types):
        expected = window - 1 if kind == "sliding_attention" else 20
        assert cache.keys[layer].shape[2] == expected, (layer, kind)


def test_decode_bench_writes_json_and_report(tiny_dir, tmp_path) -> None:
    record = run_decode_bench(
        name="tiny", model_path=str(tiny_dir), prompt_len=9, max_new_tokens=4,
        batch_sizes=[1, 3], engine="native", repeats=2, warmup=1,
        out_dir=tmp_path / "artifacts", report_dir=tmp_path / "reports",
    )  # fmt: skip
    saved = json.loads((tmp_path / "artifacts" / "tiny.json").read_text())
    assert saved["engine"] == "native" and saved["prompt_len_tokens"] == 9
    assert [r["batch_size"] for r in saved["results"]] == [1, 3]
    for r in saved["results"]:
        assert r["output_tokens"] == r["batch_size"] * 4
        assert r["tok_s_total"] > 0 and r["decode_tok_s"] > 0
    report = (tmp_path / "reports" / "decode_bench_tiny.md").read_text()
    assert "| 3 |" in report and record["report_path"].endswith("decode_bench_tiny.md")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"engine": "tensorrt"}, "engine must be one of"),
        ({"name": "../x"}, "name must be a plain file name"),
        ({"batch_sizes": [0]}, "batch_sizes"),
    ],
)
def test_decode_bench_refuses_bad_input(tiny_dir, tmp_path, kwargs, match) -> None:
    args = {"name": "t", "model_path": str(tiny_dir), "out_dir": tmp_path, "report_dir": tmp_path}
    with pytest.raises(ParameterError, match=match):
        run_decode_bench(**{**args, **kwargs})
    assert not list(tmp_path.iterdir())


def test_missing_engine_is_refused() -> None:
    pytest.importorskip("torch")
    if pick_engine("auto") != "native":
        pytest.skip("sglang or vllm is installed here")
    with pytest.raises(ParameterError, match="not installed"):
        pick_engine("vllm")


def test_decode_bench_task_through_versa_run(tiny_dir, tmp_path) -> None:
    from runner_support import cli, runner_env

    result = cli(
        ["--output-dir", str(tmp_path), "--task", "decode_bench", "--name", "tiny",
         "--model-path", str(tiny_dir), "--prompt-len", "8", "--max-new-tokens", "3",
         "--batch-sizes", "1,2", "--engine", "native", "--repeats", "1", "--no-detach"],
        cwd=tmp_path, env=runner_env(tmp_path), timeout_s=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads((tmp_path / "artifacts" / "decode_bench" / "tiny.json").read_text())
    assert [r["batch_size"] for r in saved["results"]] == [1, 2] and saved["repeats"] == 1
    assert (tmp_path / "reports" / "decode_bench_tiny.md").is_file()
    assert list((tmp_path / "reports" / "notebooks").glob("*_decode_bench.ipynb"))
