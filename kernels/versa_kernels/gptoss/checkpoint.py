"""Streaming read and write of gpt-oss safetensors checkpoints, one tensor at a time.

Reading: `Checkpoint(path)` opens `model.safetensors.index.json` (or a single / unindexed set of
`*.safetensors` files) and, per `get(name)`, memory-maps that tensor's shard with `safe_open`
and materializes only that tensor, so peak host memory stays near the largest tensor (measured
in benchmarks/bench_checkpoint_memory.py). `get_expert_weights(layer)` decodes a layer's experts to
the reference orientation (gate_up [E, 2I, H], down [E, H, I]) from MXFP4 or BF16 layouts.

Writing: `ShardedWriter` writes each tensor's bytes into the current shard as it arrives, after
a reserved, space-padded header region that is filled in when the shard closes (no shard is
ever held in memory, and the data is written once). Everything lands in `<out>.tmp-<hex>` and is renamed to `<out>` only after the index
(`metadata.total_size`, `weight_map`) is written, so a reader never sees a half-written
checkpoint and a failure leaves no `<out>`.

What is easy to get wrong:

- transformers' `save_pretrained` after `Mxfp4Config(dequantize=True)` writes BF16 data under the
  `_blocks` names and reloading silently re-initialises experts (gptoss_reference.md §3.2): write
  checkpoints with `ShardedWriter`, never with `save_pretrained`.
- The hub's BF16 layout stores `gate_up_proj` as [E, H, 2I] (input-major); we transpose it back.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from versa_kernels.errors import CheckpointFormatError
from versa_kernels.gptoss.config import CONFIG_FILE, GptOssConfig
from versa_kernels.gptoss.mxfp4 import decode_mxfp4

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"  # HF save_pretrained numbering
HEADER_LENGTH_BYTES = 8  # little-endian u64 before the JSON header (safetensors format)
HEADER_ALIGN = 8  # the header is space-padded so tensor data starts 8-byte aligned
# Header space reserved at the front of each shard so tensor bytes can be written in place as
# they arrive (no second pass over the data); JSON allows the trailing spaces that pad it, as
# safetensors' own writer does for alignment. max_shard_bytes / 1024, within [4 KiB, 1 MiB]:
# 1 MiB holds ~9000 entries of ~110 bytes, more than any gpt-oss shard has.
HEADER_RESERVE_MIN, HEADER_RESERVE_MAX, HEADER_RESERVE_FRACTION = 4 << 10, 1 << 20, 1024
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # the size transformers' save_pretrained uses (5 GB)
MISSING_PREVIEW = 5  # how many names an error lists

# Files next to the weights that a rewritten checkpoint should carry over unchanged.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

DTYPE_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

# Per-layer expert tensors by role. MXFP4 weights are a (blocks, scales) pair; BF16 ones a single
# HF-orientation tensor. `get_expert_weights` dispatches on which form the checkpoint holds.
EXPERT_PREFIX = "model.layers.{layer}.mlp.experts."
MXFP4_WEIGHTS = {"gate_up": "gate_up_proj", "down": "down_proj"}
EXPERT_BIASES = {"gate_up_bias": "gate_up_proj_bias", "down_bias": "down_proj_bias"}


def expected_tensor_names(config: GptOssConfig) -> list[str]:
    """Every tensor name an HF-layout gpt-oss checkpoint with this config must hold."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    expert_weights = (
        [f"{w}_{part}" for w in MXFP4_WEIGHTS.values() for part in ("blocks", "scales")]
        if config.is_mxfp4
        else list(MXFP4_WEIGHTS.values())
    )
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{m}_proj.{t}" for m in "qkvo" for t in ("weight", "bias")]
        names += [p + "self_attn.sinks", p + "mlp.router.weight", p + "mlp.router.bias"]
        names += [p + "mlp.experts." + n for n in expert_weights + list(EXPERT_BIASES.values())]
    return names


class Checkpoint:
    """A gpt-oss checkpoint directory read lazily: `get(name)` materializes one tensor."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointFormatError(f"checkpoint directory {self.path} does not exist")
        self.config = GptOssConfig.from_dir(self.path)
        self._weight_map = _read_weight_map(self.path)

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._weight_map)

    def shard_of(self, name: str) -> str:
        """The shard file (relative name) holding `name`."""
        self._require([name])
        return self._weight_map[name]

    def info(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype string, shape) of one tensor, read from the header only."""
        with self._open(self.shard_of(name)) as handle:
            tensor_slice = handle.get_slice(name)
            return tensor_slice.get_dtype(), list(tensor_slice.get_shape())

    def get(self, name: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load one tensor from its memory-mapped shard, straight onto `device`.

        The shard is opened for this call only. A handle kept open across calls keeps every page
        it has touched resident: streaming a 3.05 GiB checkpoint through cached handles peaked at
        1.08x the checkpoint size in RSS (benchmarks/bench_checkpoint_memory.py); per-call
        handles bound it by the tensors alive at once. Re-reading the header costs ~1 ms.
        """
        with self._open(self.shard_of(name), device=device) as handle:
            return handle.get_tensor(name)

    def check_complete(self) -> None:
        """Raise CheckpointFormatError naming the first missing tensors, if any are missing."""
        self._require(expected_tensor_names(self.config))

    def get_expert_weights(
        self,
        layer: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """One layer's experts, dequantized to the reference orientation in `dtype` on `device`.

        Returns gate_up [E, 2I, H], gate_up_bias [E, 2I], down [E, H, I], down_bias [E, H].
        MXFP4 is decoded in bf16 (the exact values, as transformers does) on `device` (a GPU
        decodes the 20b in seconds, a CPU in about a minute) and then cast.
        """
        prefix = EXPERT_PREFIX.format(layer=layer)
        self.config.num_experts(layer)  # IndexError on a bad layer number
        out: dict[str, torch.Tensor] = {}
        for role, base in MXFP4_WEIGHTS.items():
            blocks, scales = prefix + base + "_blocks", prefix + base + "_scales"
            if blocks in self._weight_map:
                self._require([blocks, scales])
                weight = decode_mxfp4(
                    self.get(blocks, device=device),
                    self.get(scales, device=device),
                    dtype=torch.bfloat16,
                )
                out[role] = weight.to(dtype)  # [E, rows, cols]
            else:
                self._require([prefix + base])
                out[role] = (
                    self.get(prefix + base, device=device).transpose(1, 2).to(dtype).contiguous()
                )
        for role, name in EXPERT_BIASES.items():
            self._require([prefix + name])
            out[role] = self.get(prefix + name, device=device).to(dtype)
        return out

    def close(self) -> None:
        """Nothing to release (shards are opened per call); kept for `with Checkpoint(...)`."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self._weight_map]
        if missing:
            shown = ", ".join(missing[:MISSING_PREVIEW])
            more = (
                f" and {len(missing) - MISSING_PREVIEW} more"
                if len(missing) > MISSING_PREVIEW
                else ""
            )
            raise CheckpointFormatError(
                f"{self.path}: missing {len(missing)} tensor(s): {shown}{more}",
                hint="The checkpoint is incomplete or not in the HF gpt-oss layout; re-download it.",
            )

    def _open(self, shard: str, *, device: str | torch.device = "cpu") -> Any:
        file = self.path / shard
        if not file.is_file():
            raise CheckpointFormatError(f"{self.path}: shard {shard} named in the index is missing")
        return safe_open(str(file), framework="pt", device=str(device))


def _read_weight_map(path: Path) -> dict[str, str]:
    """tensor name -> shard file, from the index, or from the headers of unindexed files."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointFormatError(f"{index} is not a valid safetensors index: {exc}") from exc
        return dict(weight_map)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointFormatError(
            f"{path}: no {INDEX_FILE} and no *.safetensors files",
            hint="Point at the directory holding config.json and the model-*.safetensors shards.",
        )
    weight_map: dict[str, str] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as handle:
            for key in handle.keys():
                weight_map[key] = name
    return weight_map


class ShardedWriter:
    """Write tensors into size-capped safetensors shards plus an index, atomically.

    Use as a context manager: on a clean exit the temporary directory `<out>.tmp-<hex>` is
    completed (shards renamed `model-0000i-of-0000n.safetensors`, index written) and renamed to
    `out_dir`; on an exception it is deleted and `out_dir` is left as it was.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointFormatError(
                f"output directory {self.out_dir} already exists",
                hint="Choose a new output directory or remove the old one first.",
            )
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp_dir = self.out_dir.with_name(f"{self.out_dir.name}.tmp-{secrets.token_hex(4)}")
        self.tmp_dir.mkdir(parents=True)
        reserve = max_shard_bytes // HEADER_RESERVE_FRACTION
        reserve = min(max(reserve, HEADER_RESERVE_MIN), HEADER_RESERVE_MAX)
        self.header_reserve = reserve + (-reserve % HEADER_ALIGN)
        self._shards: list[tuple[Path, dict[str, Any]]] = []  # (partial file, header) per shard
        self._data: Any = None
        self._offset = 0
        self._header_used = 0
        self._names: set[str] = set()
        self.total_size = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a new shard starts when this one would exceed the cap."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if name in self._names:
            raise ValueError(f"tensor {name} was already written")
        if tensor.dtype not in DTYPE_TO_SAFETENSORS:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
        nbytes = data.numel()
        entry = {"dtype": DTYPE_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape)}
        if (
            self._data is None
            or (self._offset and self._offset + nbytes > self.max_shard_bytes)
            or self._header_used + _entry_bytes(name, entry, self._offset, nbytes)
            > self.header_reserve
        ):
            self._start_shard()
        self._header_used += _entry_bytes(name, entry, self._offset, nbytes)
        if self._header_used > self.header_reserve:
            raise ValueError(
                f"{name}: header entry does not fit the {self.header_reserve}-byte reserve"
            )
        self._data.write(data.numpy().data)
        self._shards[-1][1][name] = {**entry, "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_size += nbytes
        self._names.add(name)

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON side file (config.json, generation_config.json) into the checkpoint."""
        (self.tmp_dir / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")

    def copy_side_files(
        self, src_dir: str | os.PathLike[str], names: tuple[str, ...] = SIDE_FILES
    ) -> list[str]:
        """Copy tokenizer, chat template and generation config from `src_dir`; returns those copied."""
        copied = []
        for name in names:
            src = Path(src_dir) / name
            if src.is_file():
                shutil.copyfile(src, self.tmp_dir / name)
                copied.append(name)
        return copied

    def commit(self) -> Path:
        """Finish shards, write the index, and rename the temporary directory to `out_dir`."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        self._close_data()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (part_file, header) in enumerate(self._shards, start=1):
            shard_name = SHARD_NAME.format(index=i, count=count)
            os.replace(part_file, self.tmp_dir / shard_name)
            weight_map.update({k: shard_name for k in header})
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if self.out_dir.exists():
            old = self.out_dir.with_name(f"{self.out_dir.name}.old-{secrets.token_hex(4)}")
            os.replace(self.out_dir, old)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp_dir, self.out_dir)
        self._closed = True
        log.info(
            "wrote %d tensors, %d bytes in %d shard(s) to %s",
            len(weight_map),
            self.total_size,
            count,
            self.out_dir,
        )
        return self.out_dir

    def abort(self) -> None:
        """Delete the temporary directory; `out_dir` is untouched."""
        self._close_data()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _start_shard(self) -> None:
        self._close_data()
        part_file = self.tmp_dir / f".shard-{len(self._shards):05d}.part"
        self._data = open(part_file, "wb")  # noqa: SIM115 - closed in _close_data
        self._data.seek(HEADER_LENGTH_BYTES + self.header_reserve)  # tensor data starts here
        self._shards.append((part_file, {}))
        self._offset = 0
        self._header_used = len(_header_json({"__metadata__": self.metadata}))

    def _close_data(self) -> None:
        """Fill in the current shard's header (padded to the reserve) and close it."""
        if self._data is None:
            return
        header = _header_json({"__metadata__": self.metadata, **self._shards[-1][1]})
        if len(header) > self.header_reserve:  # _entry_bytes is exact, so this is a bug
            raise RuntimeError(
                f"shard header {len(header)} B exceeds its {self.header_reserve} B reserve"
            )
        self._data.seek(0)
        self._data.write(struct.pack("<Q", self.header_reserve))
        self._data.write(header + b" " * (self.header_reserve - len(header)))
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        self._data = None


def _header_json(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _entry_bytes(name: str, entry: dict[str, Any], offset: int, nbytes: int) -> int:
    """Bytes `name`'s entry adds to the header JSON: `"name":{...}` plus its comma."""
    full = {**entry, "data_offsets": [offset, offset + nbytes]}
    return len(_header_json({name: full})) - 1  # minus the braces, plus one comma


def read_config_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw `config.json` of a checkpoint (for rewrites that must keep unknown keys)."""
    return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
