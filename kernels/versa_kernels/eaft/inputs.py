"""What `eaft_single` checks and reads before any model is loaded: parameters, pack rows, the
checkpoint location.

Every parameter is checked with one line naming it and the allowed values; packs are parquet
files with a `text` column (local paths, or files of a Hugging Face dataset repo).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from versa_kernels.eaft.stats import PROB_SCALES
from versa_kernels.errors import DataError, ParameterError

TEXT_COLUMN = "text"

__all__ = [
    "TEXT_COLUMN",
    "check_params",
    "parse_int_csv",
    "parse_str_csv",
    "read_pack_texts",
    "resolve_model_path",
    "resolve_pack_files",
]


def read_pack_texts(path: str | Path, *, text_column: str = TEXT_COLUMN) -> list[str]:
    """All rows of one parquet pack, in file order (non-string cells skipped)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration pack {str(path)!r} does not exist")
    try:
        table = pq.read_table(path, columns=[text_column])
    except Exception as exc:  # pyarrow raises several types for bad files; keep the cause
        raise DataError(
            f"calibration pack {str(path)!r} is not a parquet file with a {text_column!r} column"
        ) from exc
    return [t for t in table.column(text_column).to_pylist() if isinstance(t, str)]


def check_params(
    *,
    model_id: str,
    seq_lens: Sequence[int],
    num_blocks: int,
    batch_size: int,
    sample_points: int,
    top_k: int,
    entropy_top_k: int,
    cc_quantile: float,
    prob_scale: str,
    chunk_tokens: int,
) -> None:
    """Every parameter checked before any model or data is loaded."""
    checks = [
        (bool(model_id), "model_id", model_id, "a non-empty label"),
        (
            len(seq_lens) > 0 and all(int(s) >= 2 for s in seq_lens),
            "seq_lens_csv",
            seq_lens,
            "integers >= 2",
        ),
        (num_blocks >= 1, "num_blocks", num_blocks, "an integer >= 1"),
        (batch_size >= 1, "batch_size", batch_size, "an integer >= 1"),
        (sample_points >= 0, "sample_points", sample_points, "an integer >= 0"),
        (top_k >= 1, "top_k", top_k, "an integer >= 1 (experts per token)"),
        (entropy_top_k >= 2, "entropy_top_k", entropy_top_k, "an integer >= 2"),
        (0.0 < cc_quantile < 1.0, "cc_quantile", cc_quantile, "a number in (0, 1)"),
        (prob_scale in PROB_SCALES, "prob_scale", prob_scale, f"one of {', '.join(PROB_SCALES)}"),
        (chunk_tokens >= 1, "chunk_tokens", chunk_tokens, "an integer >= 1"),
    ]
    for ok, name, value, allowed in checks:
        if not ok:
            raise ParameterError(f"{name}={value!r} is not allowed; expected {allowed}")


def parse_int_csv(value: str | Sequence[int], name: str) -> list[int]:
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ParameterError(
                f"{name}={value!r} is not a comma-separated list of integers"
            ) from None
    return [int(v) for v in value]


def parse_str_csv(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def resolve_pack_files(repo: str, files: Sequence[str]) -> list[Path]:
    """Local paths as given; otherwise files of the HF dataset repo (via versa_kernels.packs)."""
    if all(Path(f).is_file() for f in files):
        return [Path(f) for f in files]
    from versa_kernels.packs import fetch_pack_files

    return fetch_pack_files(repo, files)


def resolve_model_path(model_id: str, model_path: str) -> str:
    """`model_path` if given; else `model_id` as a local directory or a Hugging Face repo id."""
    if model_path:
        if not Path(model_path).is_dir():
            raise ParameterError(
                f"model_path={model_path!r} is not a checkpoint directory",
                hint="Pass the directory holding config.json and the safetensors shards.",
            )
        return model_path
    if Path(model_id).is_dir():
        return model_id
    import os

    from huggingface_hub import snapshot_download

    try:  # the token arrives as the HF_TOKEN secret, never as a parameter
        return snapshot_download(model_id, token=os.environ.get("HF_TOKEN") or None)
    except Exception as exc:  # huggingface_hub raises many types; keep the cause
        raise ParameterError(
            f"model_path is empty and model_id={model_id!r} is neither a directory nor a "
            f"downloadable Hugging Face model ({type(exc).__name__})",
            hint="Pass --model-path with the checkpoint directory on the target.",
        ) from exc
