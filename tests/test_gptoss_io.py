"""gpt-oss config parsing, MXFP4 decode/encode, and the streaming checkpoint reader/writer."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from versa_kernels.errors import CheckpointFormatError
from versa_kernels.gptoss import __all__ as gptoss_all
from versa_kernels.gptoss.checkpoint import INDEX_FILE, Checkpoint, ShardedWriter
from versa_kernels.gptoss.config import GptOssConfig
from versa_kernels.gptoss.mxfp4 import (
    BYTES_PER_BLOCK,
    FP4_VALUES,
    VALUES_PER_BLOCK,
    decode_mxfp4,
    encode_mxfp4,
)

HUB_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "experts_per_token": 4,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "rope_theta": 150000,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 4096,
        "truncate": False,
    },
    "max_position_embeddings": 131072,
    "initial_context_length": 4096,
    "swiglu_limit": 7.0,
    "rms_norm_eps": 1e-05,
    "vocab_size": 201088,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]},
}


def test_package_exports_resolve() -> None:
    import versa_kernels.gptoss as gptoss

    for name in gptoss_all:
        assert getattr(gptoss, name) is not None


# --- config -----------------------------------------------------------------------------------


def test_config_20b_hub() -> None:
    cfg = GptOssConfig.from_dict(HUB_20B)
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (24, 32, 4)
    assert cfg.experts_per_layer == (32,) * 24 and cfg.num_experts(23) == 32 and cfg.is_uniform
    assert cfg.layer_types[:2] == ("sliding_attention", "full_attention")
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 32.0
    assert cfg.swiglu_alpha == 1.702  # absent from the hub file: transformers' default
    assert cfg.is_mxfp4 and cfg.sliding_window == 128
    with pytest.raises(IndexError):
        cfg.num_experts(24)


def test_config_120b_with_transformers5_rope_parameters() -> None:
    d = {k: v for k, v in HUB_20B.items() if k not in ("rope_scaling", "rope_theta")}
    d.update(
        num_hidden_layers=36,
        num_local_experts=128,
        layer_types=["sliding_attention", "full_attention"] * 18,
    )
    d["rope_parameters"] = {**HUB_20B["rope_scaling"], "rope_theta": 150000.0}
    cfg = GptOssConfig.from_dict(d)
    assert cfg.num_hidden_layers == 36 and cfg.num_experts(35) == 128
    assert cfg.rope_theta == 150000.0 and "rope_theta" not in cfg.rope_scaling
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096


def test_config_top_k_from_either_key_and_conflict() -> None:
    legacy = {k: v for k, v in HUB_20B.items() if k != "num_experts_per_tok"}
    assert GptOssConfig.from_dict({**legacy, "experts_per_token": 2}).num_experts_per_tok == 2
    modern = {k: v for k, v in HUB_20B.items() if k != "experts_per_token"}
    assert GptOssConfig.from_dict({**modern, "num_experts_per_tok": 3}).num_experts_per_tok == 3
    with pytest.raises(
        CheckpointFormatError, match="num_experts_per_tok=4 and experts_per_token=2"
    ):
        GptOssConfig.from_dict({**HUB_20B, "experts_per_token": 2})


def test_config_original_format_is_upgraded_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    original = {
        "num_hidden_layers": 2, "num_experts": 8, "experts_per_token": 4, "vocab_size": 1024,
        "hidden_size": 64, "intermediate_size": 64, "swiglu_limit": 7.0, "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4,
        "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0,
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="versa_kernels.gptoss.config"):
        cfg = GptOssConfig.from_dict(original)
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 4
    assert cfg.rope_scaling["factor"] == 32.0 and cfg.rope_scaling["beta_fast"] == 32.0
    assert cfg.layer_types == ("sliding_attention", "full_attention")
    text = caplog.text
    for fill in ("num_experts -> num_local_experts", "rope_scaling", "layer_types", "rms_norm_eps"):
        assert fill in text


def test_config_per_layer_counts_round_trip() -> None:
    d = {
        **HUB_20B,
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    }
    cfg = GptOssConfig.from_dict({**d, "num_local_experts_per_layer": [8, 6, 4]})
    assert cfg.experts_per_layer == (8, 6, 4) and cfg.num_local_experts == 8 and not cfg.is_uniform
    again = GptOssConfig.from_dict(cfg.to_hf_dict())
    assert again == cfg
    with pytest.raises(CheckpointFormatError, match="list of 3 ints"):
        GptOssConfig.from_dict({**d, "num_local_experts_per_layer": [8, 6]})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
            "not a gpt-oss checkpoint",
        ),
        ({"architectures": ["MixtralForCausalLM"]}, "does not include GptOssForCausalLM"),
        ({"num_local_experts": None}, "lacks num_local_experts"),
        ({"layer_types": ["sliding_attention"] * 3}, "layer_types must be 24 entries"),
    ],
)
def test_config_errors_name_the_problem(change: dict, message: str) -> None:
    d = {k: v for k, v in {**HUB_20B, **change}.items() if v is not None}
    with pytest.raises(CheckpointFormatError, match=message):
        GptOssConfig.from_dict(d)


def test_config_from_dir_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointFormatError, match="no config.json"):
        GptOssConfig.from_dir(tmp_path)


# --- MXFP4 -----------------------------------------------------------------------------------


def _random_mxfp4(seed: int, shape=(3, 12, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, BYTES_PER_BLOCK), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 150, shape, dtype=torch.uint8, generator=gen)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_equals_transformers_bit_for_bit(dtype: torch.dtype) -> None:
    from transformers.integrations.mxfp4 import FP4_VALUES as HF_FP4_VALUES
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    assert list(FP4_VALUES) == list(HF_FP4_VALUES)
    blocks, scales = _random_mxfp4(0)
    ours = decode_mxfp4(blocks, scales, dtype=dtype, rows_per_chunk=5)  # [E, R, 32G]
    theirs = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)  # [E, 32G, R]
    int_view = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert ours.shape == (3, 12, 4 * VALUES_PER_BLOCK)
    assert torch.equal(ours.transpose(1, 2).contiguous().view(int_view), theirs.view(int_view))


def test_decode_nibble_order_and_scale() -> None:
    blocks = torch.zeros(1, 1, BYTES_PER_BLOCK, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x7A  # low nibble 0xA (-1.0) is element 0, high nibble 0x7 (6.0) element 1
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^(128-127) = 2
    out = decode_mxfp4(blocks, scales, dtype=torch.float32)
    assert out[0, :2].tolist() == [-2.0, 12.0] and out[0, 2:].abs().sum() == 0


def test_decode_is_chunk_invariant() -> None:
    blocks, scales = _random_mxfp4(1)
    whole = decode_mxfp4(blocks, scales, dtype=torch.float32)
    assert torch.equal(whole, decode_mxfp4(blocks, scales, dtype=torch.float32, rows_per_chunk=1))


def test_encode_round_trips_representable_values() -> None:
    blocks, scales = _random_mxfp4(2)
    values = decode_mxfp4(blocks, scales, dtype=torch.float32)
    blocks2, scales2 = encode_mxfp4(values, rows_per_chunk=7)
    assert blocks2.shape == blocks.shape and scales2.shape == scales.shape
    assert torch.equal(decode_mxfp4(blocks2, scales2, dtype=torch.float32), values)
    # bf16 in, bf16 decode out: same values again
    assert torch.equal(decode_mxfp4(*encode_mxfp4(values.bfloat16())), values.bfloat16())


def test_encode_rounds_to_nearest_without_saturating() -> None:
    x = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(3))
    blocks, scales = encode_mxfp4(x)
    y = decode_mxfp4(blocks, scales, dtype=torch.float32)
    # the block max maps into (3, 6] * scale, so the largest E2M1 step (2) bounds the error by 1 * scale
    scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127)  # [4, 8, 2]
    err = (x - y).abs().reshape(4, 8, 2, VALUES_PER_BLOCK)
    assert bool((err <= scale[..., None]).all())
    amax = x.abs().reshape(4, 8, 2, VALUES_PER_BLOCK).amax(-1)
    assert bool((amax <= 6 * scale).all()) and bool((amax > 3 * scale).all())  # ROUND_UP scale rule
    zeros_b, zeros_s = encode_mxfp4(torch.zeros(1, 32))
    assert int(zeros_b.sum()) == 0 and decode_mxfp4(zeros_b, zeros_s).abs().sum() == 0


def test_encode_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_mxfp4(torch.zeros(2, 33))
    with pytest.raises(ValueError, match="uint8"):
        decode_mxfp4(torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.uint8))


# --- sharded writer and reader ----------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {
        "a.weight": torch.randn(64, 32, generator=gen).bfloat16(),  # 4096 B
        "b.blocks": torch.randint(0, 256, (8, 16, 16), dtype=torch.uint8, generator=gen),  # 2048 B
        "c.bias": torch.randn(100, generator=gen),  # 400 B
        "d.big": torch.randn(
            1500, generator=gen
        ),  # 6000 B, bigger than the cap: a shard of its own
        "e.scalar": torch.tensor(3.5),
    }


def test_sharded_writer_caps_shards_and_writes_index(tmp_path) -> None:
    out = tmp_path / "ckpt"
    tensors = _tensors()
    with ShardedWriter(out, max_shard_bytes=5000, metadata={"harmony": "base"}) as writer:
        for name, t in tensors.items():
            writer.add(name, t)
    assert not list(tmp_path.glob("ckpt.tmp-*"))
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    assert sorted(index["weight_map"]) == sorted(tensors)
    shards = sorted({*index["weight_map"].values()})
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt", "harmony": "base"}
            names = list(fh.keys())
            payload = sum(fh.get_tensor(n).numel() * fh.get_tensor(n).element_size() for n in names)
            assert (
                payload <= 5000 or len(names) == 1
            )  # only a lone oversized tensor may exceed the cap
            for n in names:
                assert index["weight_map"][n] == shard
                assert torch.equal(fh.get_tensor(n), tensors[n])


def test_sharded_writer_starts_a_shard_when_the_header_reserve_is_full(tmp_path) -> None:
    """Many small tensors: the in-place header reserve, not the byte cap, splits the shards."""
    out = tmp_path / "ckpt"
    tensors = {
        f"model.layers.{i}.self_attn.some_rather_long_parameter_name.bias": torch.full(
            (2,), float(i)
        )
        for i in range(100)
    }
    with ShardedWriter(out, max_shard_bytes=1 << 20) as writer:
        assert writer.header_reserve == 4096
        for name, t in tensors.items():
            writer.add(name, t)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) == 3 and sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, INDEX_FILE]
    )
    for shard in shards:
        raw = (out / shard).read_bytes()
        assert int.from_bytes(raw[:8], "little") == 4096  # header padded to the reserve
        with safe_open(str(out / shard), framework="pt") as fh:
            for n in fh.keys():
                assert torch.equal(fh.get_tensor(n), tensors[n])


def test_sharded_writer_failure_leaves_no_output(tmp_path) -> None:
    out = tmp_path / "ckpt"
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardedWriter(out, max_shard_bytes=1000) as writer,
    ):
        writer.add("a", torch.zeros(1000))
        raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sharded_writer_refuses_existing_and_overwrites_when_asked(tmp_path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(CheckpointFormatError, match="already exists"):
        ShardedWriter(out)
    with ShardedWriter(out, overwrite=True) as writer:
        writer.add("x", torch.ones(3))
    assert not (out / "stale.txt").exists() and (out / INDEX_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _write_config(path, **over) -> None:
    cfg = {**HUB_20B, "num_hidden_layers": 1, "num_local_experts": 2, "hidden_size": 32,
           "intermediate_size": 32, "layer_types": ["sliding_attention"], **over}  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))


def test_checkpoint_reads_single_file_bf16_layout(tmp_path) -> None:
    """An unindexed BF16 HF-layout checkpoint: experts come back in reference orientation."""
    _write_config(tmp_path, quantization_config=None)
    gate_up_hf = torch.randn(2, 32, 64).bfloat16()  # [E, H, 2I] as transformers stores it
    down_hf = torch.randn(2, 32, 32).bfloat16()  # [E, I, H]
    p = "model.layers.0.mlp.experts."
    save_file(
        {p + "gate_up_proj": gate_up_hf, p + "down_proj": down_hf,
         p + "gate_up_proj_bias": torch.zeros(2, 64).bfloat16(), p + "down_proj_bias": torch.ones(2, 32).bfloat16()},
        str(tmp_path / "model.safetensors"),
    )  # fmt: skip
    ckpt = Checkpoint(tmp_path)
    w = ckpt.get_expert_weights(0)
    assert w["gate_up"].shape == (2, 64, 32) and torch.equal(
        w["gate_up"], gate_up_hf.transpose(1, 2).float()
    )
    assert w["down"].shape == (2, 32, 32) and torch.equal(
        w["down"], down_hf.transpose(1, 2).float()
    )
    assert ckpt.info(p + "down_proj") == ("BF16", [2, 32, 32])
    with pytest.raises(CheckpointFormatError, match="missing .* tensor") as exc:
        ckpt.check_complete()
    assert "model.embed_tokens.weight" in str(exc.value) and "more" in str(exc.value)


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    _write_config(tmp_path / "llama", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointFormatError, match="not a gpt-oss checkpoint"):
        Checkpoint(tmp_path / "llama")
    _write_config(tmp_path / "empty")
    with pytest.raises(CheckpointFormatError, match="no model.safetensors.index.json"):
        Checkpoint(tmp_path / "empty")
    _write_config(tmp_path / "ok")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(
        CheckpointFormatError, match="missing 1 tensor.*mlp.experts.gate_up_proj_bias"
    ):
        Checkpoint(tmp_path / "ok").get("model.layers.0.mlp.experts.gate_up_proj_bias")
