"""Checkpoint rewrite: byte-exact slices, both layouts load, pruning equals router masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from versa_kernels.eaftreap.evaluate import keep_masks
from versa_kernels.eaftreap.rewrite import DUMMY_ROUTER_BIAS, rewrite_checkpoint
from versa_kernels.errors import ParameterError
from versa_kernels.gptoss.checkpoint import Checkpoint
from versa_kernels.gptoss.model import GptOssModel

KEPT_PER_LAYER = [[0, 2, 3, 5, 7], [1, 2, 4, 6], [0, 1, 2, 3, 4, 5], [0, 1, 3, 4, 5, 6, 7]]
KEPT_4 = [[0, 2, 3, 5], [1, 2, 4, 6], [0, 1, 2, 3], [1, 4, 6, 7]]
IDS = (torch.arange(40) * 37 % 1000)[None]  # [1, 40], one deterministic sequence


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from versa_kernels.fixtures import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


def _logits(model: GptOssModel, router_mask=None) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS, router_mask=router_mask)
        return model.logits(out.hidden[0])  # [T, V]


def test_rewrite_slices_bytes_along_the_expert_dimension(base: Path, tmp_path: Path) -> None:
    kept = KEPT_4
    result = rewrite_checkpoint(base, tmp_path / "pruned", kept, layout="uniform")
    src, dst = Checkpoint(base), Checkpoint(result.out_dir)
    assert src.names() == dst.names()
    moe = 0
    for name in src.names():
        a, b = src.get(name), dst.get(name)
        if ".mlp.router." in name or ".mlp.experts." in name:
            layer = int(name.split(".")[2])
            expected = a[torch.tensor(kept[layer])]
            moe += 1
        else:
            expected = a
        assert b.dtype == a.dtype and torch.equal(b.view(torch.uint8), expected.view(torch.uint8))
    assert moe == 4 * 8  # router weight/bias + 6 expert tensors per layer, all sliced
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and "num_local_experts_per_layer" not in cfg
    assert cfg["num_experts_per_tok"] == cfg["experts_per_token"] == 4  # top_k unchanged
    mapping = json.loads((result.out_dir / "expert_mapping.json").read_text())
    assert mapping["1"] == {"1": 0, "2": 1, "4": 2, "6": 3}
    for name in ("tokenizer.json", "generation_config.json"):
        assert (result.out_dir / name).read_bytes() == (base / name).read_bytes()
    assert dst.config.experts_per_layer == (4, 4, 4, 4)


def test_pruned_model_equals_masked_base_and_keep_all_is_identical(
    base: Path, tmp_path: Path
) -> None:
    model = GptOssModel.from_checkpoint(base)
    pruned = rewrite_checkpoint(base, tmp_path / "p", KEPT_4, layout="uniform")
    masked = _logits(model, keep_masks(KEPT_4, [8] * 4))
    ours = _logits(GptOssModel.from_checkpoint(pruned.out_dir))
    assert (ours - masked).abs().max() < 1e-5, f"max diff {(ours - masked).abs().max():.3g}"
    assert (ours - _logits(model)).abs().max() > 1e-3  # pruning changed something
    full = rewrite_checkpoint(base, tmp_path / "all", [list(range(8))] * 4, layout="uniform")
    assert torch.equal(_logits(GptOssModel.from_checkpoint(full.out_dir)), _logits(model))


def test_per_layer_layout_loads_in_transformers_and_our_forward(base: Path, tmp_path: Path) -> None:
    from transformers import GptOssForCausalLM, Mxfp4Config

    result = rewrite_checkpoint(
        base, tmp_path / "pl", KEPT_PER_LAYER, layout="per-layer", pad_multiple_of=4
    )
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["num_local_experts_per_layer"] == [5, 4, 6, 7]
    assert cfg["num_local_experts"] == 8  # max 7 padded to a multiple of 4
    bias = Checkpoint(result.out_dir).get("model.layers.1.mlp.router.bias")
    assert (
        bias.shape == (8,) and (bias[4:] == torch.tensor(DUMMY_ROUTER_BIAS, dtype=bias.dtype)).all()
    )

    base_model = GptOssModel.from_checkpoint(base)
    masked = _logits(base_model, keep_masks(KEPT_PER_LAYER, [8] * 4))
    ours_model = GptOssModel.from_checkpoint(result.out_dir)
    assert ours_model.experts_per_layer == (5, 4, 6, 7)
    ours = _logits(ours_model)
    assert (ours - masked).abs().max() < 1e-5, f"max diff {(ours - masked).abs().max():.3g}"

    hf, info = GptOssForCausalLM.from_pretrained(
        result.out_dir,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        output_loading_info=True,
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        theirs = hf(IDS).logits[0]  # [T, V]
    assert (theirs - ours).abs().max() < 1e-4, f"max diff {(theirs - ours).abs().max():.3g}"


def test_output_directory_rules(base: Path, tmp_path: Path) -> None:
    kept = [list(range(4))] * 4
    with pytest.raises(ParameterError, match="overlaps the base checkpoint"):
        rewrite_checkpoint(base, base, kept, layout="uniform")
    with pytest.raises(ParameterError, match="overlaps the base checkpoint"):
        rewrite_checkpoint(base, base / "inside", kept, layout="uniform")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ParameterError, match="exists and is not empty"):
        rewrite_checkpoint(base, out, kept, layout="uniform")
    assert (out / "keep.txt").read_text() == "user data"
    rewrite_checkpoint(base, out, kept, layout="uniform", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "expert_mapping.json").is_file()
    with pytest.raises(ParameterError, match="fewer than top_k=4"):
        rewrite_checkpoint(base, tmp_path / "x", [[0, 1, 2]] * 4, layout="uniform")
    with pytest.raises(ParameterError, match="unique and ascending"):
        rewrite_checkpoint(base, tmp_path / "x", [[3, 1, 2, 0]] * 4, layout="uniform")
    with pytest.raises(ParameterError, match="needs one count for every layer"):
        rewrite_checkpoint(base, tmp_path / "x", KEPT_PER_LAYER, layout="uniform")
