"""gpt-oss model configuration read from a checkpoint's `config.json`.

One frozen dataclass, `GptOssConfig`, serves gpt-oss-20b, gpt-oss-120b and the tiny fixtures:
every size is read from the file, nothing is hard-coded (gptoss_reference.md §2.5).

What is easy to get wrong:

- The top-k lives under two keys: `num_experts_per_tok` (HF, vLLM, SGLang) and the legacy
  `experts_per_token` (original OpenAI config). Either may be present; when both are, they must
  agree, otherwise we cannot know which one a runtime will use.
- transformers 5.x renames `rope_scaling` to `rope_parameters` (and folds `rope_theta` into it);
  both spellings are accepted and normalised to `rope_scaling` + `rope_theta`.
- A per-layer pruned checkpoint stores `num_local_experts_per_layer: [...]`; stock runtimes read
  only `num_local_experts`, so for such a checkpoint `num_local_experts` is the maximum.
- The original checkpoint (`original/config.json`) uses the reference dataclass keys
  (`num_experts`, `rope_scaling_factor`, ...); `_upgrade_original_keys` maps them and logs each fill.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from versa_kernels.errors import CheckpointFormatError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_TYPE = "gpt_oss"
ARCHITECTURE = "GptOssForCausalLM"
DEFAULT_TOP_K = 4  # gpt-oss routes every token to 4 experts (20b and 120b)
DEFAULT_SWIGLU_ALPHA = 1.702  # absent from the hub config.json; transformers' default
SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
MXFP4_QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
"""The hub's quantization_config for gpt-oss (reference §2.5): experts MXFP4, the rest bf16."""

# Keys a gpt-oss config must carry (after upgrades) for us to size the model.
REQUIRED_KEYS = (
    "num_hidden_layers",
    "num_local_experts",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)

# original/config.json key -> HF key (gpt_oss/torch/model.py `ModelConfig` vs configuration_gpt_oss)
ORIGINAL_KEY_MAP = {"num_experts": "num_local_experts"}

# Defaults the hub config of gpt-oss-20b/120b carries; used only to fill keys an old or original
# config lacks, and each fill is logged.
HUB_DEFAULTS: dict[str, Any] = {
    "rope_theta": 150000.0,
    "rms_norm_eps": 1e-5,
    "swiglu_limit": 7.0,
    "swiglu_alpha": DEFAULT_SWIGLU_ALPHA,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "max_position_embeddings": 131072,
    "eos_token_id": 200002,  # <|return|>
    "pad_token_id": 199999,  # <|endoftext|>
}


@dataclass(frozen=True)
class GptOssConfig:
    """The fields of a gpt-oss `config.json` the package uses, plus per-layer expert counts."""

    num_hidden_layers: int
    num_local_experts: int
    num_experts_per_tok: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_norm_eps: float
    swiglu_limit: float
    swiglu_alpha: float
    vocab_size: int
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    max_position_embeddings: int
    initial_context_length: int
    quantization_config: dict[str, Any] | None
    experts_per_layer: tuple[int, ...]

    def num_experts(self, layer: int) -> int:
        """Number of experts stored in `layer` (differs per layer only in per-layer layouts)."""
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer must be in [0, {self.num_hidden_layers}), got {layer}")
        return self.experts_per_layer[layer]

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same expert count (what stock runtimes require)."""
        return len(set(self.experts_per_layer)) == 1

    @property
    def is_mxfp4(self) -> bool:
        """True when the experts are stored as MXFP4 `*_blocks`/`*_scales`."""
        qc = self.quantization_config or {}
        return qc.get("quant_method") == "mxfp4"

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> GptOssConfig:
        """Read `<path>/config.json` (or `path` itself if it is the file)."""
        path = Path(path)
        file = path if path.is_file() else path / CONFIG_FILE
        if not file.is_file():
            raise CheckpointFormatError(f"no {CONFIG_FILE} in {path}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{file} is not readable JSON: {exc}") from exc
        return cls.from_dict(data, source=str(file))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GptOssConfig:
        """Build from a config dict (HF or original keys); raises CheckpointFormatError if not gpt-oss."""
        if not isinstance(data, dict):
            raise CheckpointFormatError(
                f"{source}: expected a JSON object, got {type(data).__name__}"
            )
        d = _check_is_gpt_oss(dict(data), source)
        d = _upgrade_original_keys(d, source)
        d = _upgrade_rope_parameters(d, source)
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise CheckpointFormatError(f"{source}: gpt-oss config lacks {', '.join(missing)}")
        layers = int(d["num_hidden_layers"])
        top_k = _top_k(d, source)
        experts_per_layer = _experts_per_layer(d, layers, source)
        layer_types = _layer_types(d, layers, source)
        for key, value in HUB_DEFAULTS.items():
            if key not in d:
                log.info("%s: %s missing, filled with the hub default %r", source, key, value)
                d[key] = value
        heads = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
        return cls(
            num_hidden_layers=layers,
            num_local_experts=max(experts_per_layer),
            num_experts_per_tok=top_k,
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            head_dim=head_dim,
            num_attention_heads=heads,
            num_key_value_heads=int(d["num_key_value_heads"]),
            sliding_window=None if d["sliding_window"] is None else int(d["sliding_window"]),
            layer_types=layer_types,
            rope_theta=float(d["rope_theta"]),
            rope_scaling=d.get("rope_scaling"),
            rms_norm_eps=float(d["rms_norm_eps"]),
            swiglu_limit=float(d["swiglu_limit"]),
            swiglu_alpha=float(d["swiglu_alpha"]),
            vocab_size=int(d["vocab_size"]),
            eos_token_id=d["eos_token_id"],
            pad_token_id=d["pad_token_id"],
            max_position_embeddings=int(d["max_position_embeddings"]),
            initial_context_length=int(d["initial_context_length"]),
            quantization_config=d.get("quantization_config"),
            experts_per_layer=experts_per_layer,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF-format `config.json` content for this config (both top-k keys written)."""
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "experts_per_token": self.num_experts_per_tok,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": self.initial_context_length,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "use_cache": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
        }
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config
        if not self.is_uniform:
            d["num_local_experts_per_layer"] = list(self.experts_per_layer)
        return d


def _check_is_gpt_oss(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse configs of other model families before reading any size from them."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type is not None and model_type != MODEL_TYPE:
        raise CheckpointFormatError(
            f"{source}: model_type is {model_type!r}, not {MODEL_TYPE!r}; this is not a gpt-oss checkpoint",
            hint="Pass an openai/gpt-oss-20b or -120b directory (or `versa-run fixtures model DIR`).",
        )
    if archs and ARCHITECTURE not in archs:
        raise CheckpointFormatError(
            f"{source}: architectures {archs} does not include {ARCHITECTURE}",
            hint="Pass an openai/gpt-oss-20b or -120b directory (or `versa-run fixtures model DIR`).",
        )
    if model_type is None and not archs and "num_experts" not in d and "num_local_experts" not in d:
        raise CheckpointFormatError(
            f"{source}: no model_type, architectures or expert count; not gpt-oss"
        )
    return d


def _upgrade_original_keys(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Map original/config.json keys (OpenAI reference `ModelConfig`) to HF keys, logging each."""
    for old, new in ORIGINAL_KEY_MAP.items():
        if old in d and new not in d:
            log.info("%s: upgraded original key %s -> %s = %r", source, old, new, d[old])
            d[new] = d[old]
    if "rope_scaling" not in d and "rope_scaling_factor" in d:
        scaling = {
            "rope_type": "yarn",
            "factor": float(d["rope_scaling_factor"]),
            "beta_fast": float(d.get("rope_ntk_beta", 32.0)),
            "beta_slow": float(d.get("rope_ntk_alpha", 1.0)),
            "original_max_position_embeddings": int(d.get("initial_context_length", 4096)),
            "truncate": False,
        }
        log.info(
            "%s: upgraded rope_scaling_factor/rope_ntk_* -> rope_scaling = %r", source, scaling
        )
        d["rope_scaling"] = scaling
    return d


def _upgrade_rope_parameters(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Accept transformers 5.x `rope_parameters` (which folds in rope_theta) as `rope_scaling`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_scaling" not in d:
        params = dict(params)
        if "rope_theta" in params and "rope_theta" not in d:
            d["rope_theta"] = params["rope_theta"]
        params.pop("rope_theta", None)
        log.info("%s: read rope_parameters as rope_scaling = %r", source, params)
        d["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    return d


def _top_k(d: dict[str, Any], source: str) -> int:
    """Top-k from either key; both present must agree."""
    new, old = d.get("num_experts_per_tok"), d.get("experts_per_token")
    if new is not None and old is not None and int(new) != int(old):
        raise CheckpointFormatError(
            f"{source}: num_experts_per_tok={new} and experts_per_token={old} disagree",
            hint="Set both keys to the same top-k (gpt-oss uses 4).",
        )
    if new is None and old is None:
        log.info("%s: no top-k key, filled num_experts_per_tok = %d", source, DEFAULT_TOP_K)
        return DEFAULT_TOP_K
    if new is None:
        log.info("%s: upgraded experts_per_token -> num_experts_per_tok = %s", source, old)
    return int(new if new is not None else old)


def _experts_per_layer(d: dict[str, Any], layers: int, source: str) -> tuple[int, ...]:
    """Per-layer counts from `num_local_experts_per_layer`, else `num_local_experts` everywhere."""
    per_layer = d.get("num_local_experts_per_layer")
    if per_layer is None:
        count = int(d["num_local_experts"])
        if count < 1:
            raise CheckpointFormatError(f"{source}: num_local_experts must be >= 1, got {count}")
        return (count,) * layers
    if not isinstance(per_layer, list) or len(per_layer) != layers:
        raise CheckpointFormatError(
            f"{source}: num_local_experts_per_layer must be a list of {layers} ints, got {per_layer!r}"
        )
    counts = tuple(int(c) for c in per_layer)
    if min(counts) < 1:
        raise CheckpointFormatError(f"{source}: num_local_experts_per_layer has a count < 1")
    return counts


def _layer_types(d: dict[str, Any], layers: int, source: str) -> tuple[str, ...]:
    """`layer_types` from the file, else gpt-oss's alternation (sliding first), logged."""
    types = d.get("layer_types")
    if types is None:
        filled = tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
        log.info("%s: layer_types missing, filled alternating sliding/full", source)
        return filled
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointFormatError(
            f"{source}: layer_types must be {layers} entries from {list(LAYER_TYPES)}, got {types!r}"
        )
    return tuple(types)
