"""Generated fixtures: tiny checkpoints load in transformers, tokenizers, packs, and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from versa_kernels.errors import ParameterError
from versa_kernels.fixtures import __all__ as fixtures_all
from versa_kernels.fixtures.cli import main
from versa_kernels.fixtures.model import make_tiny_checkpoint
from versa_kernels.fixtures.packs import COLUMNS, PACK_FILES, make_calib_packs
from versa_kernels.fixtures.tokenizer import (
    HARMONY_SPECIALS,
    build_o200k_harmony,
    build_small_harmony,
)
from versa_kernels.gptoss.checkpoint import INDEX_FILE, Checkpoint
from versa_kernels.gptoss.mxfp4 import E8M0_BIAS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "model", layers=2, experts=8, top_k=4
    )


def test_package_exports_resolve() -> None:
    import versa_kernels.fixtures as fixtures

    for name in fixtures_all:
        assert callable(getattr(fixtures, name))


def test_tiny_checkpoint_has_hub_layout(tiny: Path) -> None:
    files = sorted(p.name for p in tiny.iterdir())
    for name in (
        "config.json",
        "generation_config.json",
        INDEX_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert name in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = json.loads((tiny / "config.json").read_text())
    assert config["num_experts_per_tok"] == config["experts_per_token"] == 4
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["rope_scaling"]["rope_type"] == "yarn"
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    ckpt = Checkpoint(tiny)
    ckpt.check_complete()
    assert ckpt.info("model.layers.0.mlp.experts.gate_up_proj_blocks") == ("U8", [8, 128, 2, 16])
    assert ckpt.info("model.layers.0.mlp.experts.down_proj_scales") == ("U8", [8, 64, 2])
    assert ckpt.info("model.layers.0.self_attn.sinks") == ("BF16", [4])
    scales = ckpt.get("model.layers.1.mlp.experts.gate_up_proj_scales")
    assert 115 <= int(scales.min()) and int(scales.max()) <= E8M0_BIAS  # real 20b: ~118-124
    bias = ckpt.get("model.layers.1.mlp.experts.down_proj_bias")
    assert float(bias.float().std()) > 0.05  # non-trivial biases


def test_tiny_checkpoint_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = make_tiny_checkpoint(tmp_path / "again", layers=2, experts=8, top_k=4)
    other = make_tiny_checkpoint(tmp_path / "other", layers=2, experts=8, top_k=4, seed=1)
    names = sorted(p.name for p in tiny.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    shard = next(n for n in names if n.startswith("model-00001-of-"))
    assert (tiny / shard).read_bytes() != (other / shard).read_bytes()


def test_tiny_checkpoint_loads_in_transformers(tiny: Path) -> None:
    from transformers import GptOssForCausalLM, Mxfp4Config

    model, info = GptOssForCausalLM.from_pretrained(
        tiny,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ckpt = Checkpoint(tiny)
    for layer in range(2):
        ours = ckpt.get_expert_weights(layer)
        experts = model.model.layers[layer].mlp.experts
        assert torch.equal(experts.gate_up_proj.transpose(1, 2), ours["gate_up"])  # [E, 2I, H]
        assert torch.equal(experts.down_proj.transpose(1, 2), ours["down"])  # [E, H, I]
        assert torch.equal(experts.gate_up_proj_bias, ours["gate_up_bias"])
        assert torch.equal(experts.down_proj_bias, ours["down_bias"])
    ids = torch.arange(12)[None] * 37 % 1000  # [1, 12]
    with torch.no_grad():
        probs = model(ids).logits.softmax(-1)  # [1, 12, V]
    assert torch.isfinite(probs).all()
    assert float(probs.max(-1).values.std()) > 0.01  # not a uniform, degenerate model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": 48}, "hidden must be a positive multiple of 32"),
        ({"top_k": 9}, "top_k must be in \\[1, experts=8\\]"),
        ({"tokenizer": "gpt2"}, "tokenizer must be one of \\['small', 'o200k'\\]"),
        ({"vocab": 10}, "vocab must be >= 1024"),
    ],
)
def test_tiny_checkpoint_rejects_bad_sizes_before_writing(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ParameterError, match=message):
        make_tiny_checkpoint(tmp_path / "m", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_small_tokenizer_loads_with_specials_and_offsets(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_small_harmony(tmp_path))
    assert len(tok) == 1024 and tok.eos_token == "<|return|>" and tok.pad_token == "<|endoftext|>"
    ids = {name: tok.convert_tokens_to_ids(name) for name in HARMONY_SPECIALS}
    assert ids["<|start|>"] == 1008 and ids["<|channel|>"] == 1007 and ids["<|call|>"] == 1014
    text = "<|start|>assistant<|channel|>final<|message|>Héllo wörld<|return|>"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["input_ids"][0] == ids["<|start|>"] and enc["input_ids"][-1] == ids["<|return|>"]
    assert max(enc["input_ids"]) < 1024
    for (start, end), token_id in zip(enc["offset_mapping"], enc["input_ids"], strict=True):
        if token_id == ids["<|message|>"]:
            assert text[start:end] == "<|message|>"
    assert tok.decode(enc["input_ids"]) == text


def test_o200k_harmony_matches_bpe_openai_token_for_token(tmp_path: Path) -> None:
    import bpe_openai
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_o200k_harmony(tmp_path))
    assert len(tok) == 201088
    for name, real_id in HARMONY_SPECIALS.items():
        assert tok.convert_tokens_to_ids(name) == real_id
    assert tok.convert_tokens_to_ids("<|reserved_201087|>") == 201087
    reference = bpe_openai.get_encoding("o200k_base")
    samples = [
        "Hello",
        "Hello world! It's 2025; we'll see.",
        "  leading spaces\n\n\ttabs\r\nand CRLF",
        "Ünïcödé — 日本語のテキスト, 123456789 numbers, CamelCaseHTTPServer",
        "def f(x):\n    return x ** 2  # comment 🙂",
    ]
    assert tok.encode("Hello", add_special_tokens=False) == [13225]
    for text in samples:
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text), text
    harmony = "<|start|>user<|message|>Hi<|end|>"
    assert tok.encode(harmony, add_special_tokens=False) == [200006, *reference.encode("user"), 200008,
                                                             *reference.encode("Hi"), 200007]  # fmt: skip


def test_calib_packs_schema_and_harmony_rows(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    paths = make_calib_packs(tmp_path, rows=6, seed=3)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == list(PACK_FILES.values())
    for path in paths:
        table = pq.read_table(path)
        assert tuple(table.schema.names) == COLUMNS and table.num_rows == 6
        assert len(set(table["id"].to_pylist())) == 6
        for text in table["text"].to_pylist():
            assert text.startswith("<|start|>system<|message|>") and text.endswith("<|return|>")
            assert "<|start|>user<|message|>" in text
            assert "<|start|>assistant<|channel|>analysis<|message|>" in text
            assert "<|start|>assistant<|channel|>final<|message|>" in text
    tools = pq.read_table(paths[1])
    assert all(tools["quality_has_tool"].to_pylist())
    for text in tools["text"].to_pylist():
        assert "<|start|>assistant to=functions." in text and "<|call|>" in text
        assert "<|start|>developer<|message|>" in text
    again = make_calib_packs(tmp_path / "again", rows=6, seed=3)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again, strict=True))


def test_cli_model_packs_and_errors(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert (
        main(
            [
                "fixtures",
                "model",
                str(tmp_path / "m"),
                "--layers",
                "1",
                "--experts",
                "4",
                "--top-k",
                "2",
            ],
            out=out,
            err=err,
        )
        == 0
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (
        config["num_hidden_layers"],
        config["num_local_experts"],
        config["num_experts_per_tok"],
    ) == (1, 4, 2)
    assert "wrote tiny gpt-oss checkpoint" in out.getvalue()
    assert main(["packs", str(tmp_path / "p"), "--rows", "2"], out=out, err=err) == 0
    assert (tmp_path / "p" / "tool_agentic_10k_v6.parquet").is_file()

    err = io.StringIO()
    assert main(["model", str(tmp_path / "bad"), "--hidden", "40"], out=out, err=err) == 2
    assert (
        "hidden must be a positive multiple of 32" in err.getvalue()
        and not (tmp_path / "bad").exists()
    )
    err = io.StringIO()
    assert main(["model", str(tmp_path / "m")], out=out, err=err) == 2
    assert "already exists" in err.getvalue()
    err = io.StringIO()
    assert main(["model", str(tmp_path / "t"), "--trained", "--layers", "2"], out=out, err=err) == 2
    assert "--trained" in err.getvalue() and "--layers" in err.getvalue()


@pytest.mark.parametrize("flag, experts", [([], 16), (["tiny"], 16), (["testbed32"], 32)])
def test_trained_names_the_committed_model(tmp_path, flag, experts) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["model", str(tmp_path / "m"), "--trained", *flag], out=out, err=err) == 0, (
        err.getvalue()
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_local_experts"] == experts and config["num_experts_per_tok"] == 4
