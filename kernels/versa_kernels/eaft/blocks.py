"""Fixed-length evaluation blocks packed from calibration rows (eaftreap_spec §6.2, §6.7).

Every model of a comparison must see exactly the same tokens, so blocks are a pure function of
(rows in order, tokenizer, seq_len, num_blocks):

- Rows are read in file order. Each row is tokenized with no added special tokens (the text
  already carries its Harmony specials), its completion-only keep mask is built
  (`harmony.completion_mask`: assistant content, all channels), and one EOS token (keep False)
  is appended. Tokens go into a running buffer; whenever the buffer holds at least seq_len
  tokens a block of **exactly** seq_len tokens is cut. A row's tail carries over into the next
  block, so no token is padding.
- `keep[0]` of every block is forced False: nothing in the block predicts its first token.
- Packing stops at `num_blocks`; fewer available is an error (a silent short run would change
  PPL and break comparability).
- `block_offset` cuts and drops that many blocks first, so a run with `block_offset=num_blocks`
  sees the next `num_blocks` blocks: disjoint tokens, same sizes (the base-against-base noise
  floor). A row that straddles the boundary contributes tokens to both sides, never the same
  token.
- `rows_sha256` is SHA-256 over each consumed row's UTF-8 text followed by a NUL byte (rows read
  for dropped blocks included), so two runs can prove they used the same rows. Each (pack, seq_len) starts again at the first row.
- UNION interleaves the packs row by row (row 0 of each pack, then row 1, ...; exhausted packs
  are skipped) so no single pack fills the first blocks.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from versa_kernels.errors import DataError, ParameterError
from versa_kernels.harmony import completion_mask

UNION_PACK = "UNION"
ROW_SEPARATOR = b"\x00"  # rows_sha256 hashes text + NUL per row (spec §6.2)

__all__ = ["UNION_PACK", "Blocks", "TokenCache", "pack_blocks", "union_rows"]


@dataclass(frozen=True)
class Blocks:
    """num_blocks blocks of seq_len tokens, their keep masks and the provenance of the rows."""

    input_ids: torch.Tensor  # [N, S] int64
    keep: torch.Tensor  # [N, S] bool: True where the token is a completion token to score
    rows_seen: int
    rows_sha256: str

    @property
    def predicted_tokens(self) -> int:
        """Predictions made (kept or not): S - 1 per block."""
        n, s = self.input_ids.shape
        return n * (s - 1)


class TokenCache:
    """Tokenize each distinct row once per collection (packs and UNION share rows)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[list[int], list[bool]]] = {}

    def encode(self, text: str) -> tuple[list[int], list[bool]]:
        hit = self._cache.get(text)
        if hit is None:
            ids, mask = completion_mask(text, self.tokenizer)
            hit = (ids.tolist(), mask.tolist())
            self._cache[text] = hit
        return hit


def union_rows(packs: Mapping[str, Sequence[str]]) -> Iterator[str]:
    """Round-robin over the packs' rows (zip_longest order), skipping exhausted packs."""
    marker = object()
    for group in itertools.zip_longest(*packs.values(), fillvalue=marker):
        for row in group:
            if row is not marker:
                yield row  # type: ignore[misc]


def pack_blocks(
    rows: Iterable[str],
    tokens: TokenCache,
    *,
    seq_len: int,
    num_blocks: int,
    eos_id: int,
    pack: str = "",
    block_offset: int = 0,
) -> Blocks:
    """Cut `num_blocks` blocks of exactly `seq_len` tokens from `rows` (module docstring)."""
    if seq_len < 2:
        raise ParameterError(f"seq_len must be >= 2 (one prediction per block), got {seq_len}")
    if num_blocks < 1:
        raise ParameterError(f"num_blocks must be >= 1, got {num_blocks}")
    if block_offset < 0:
        raise ParameterError(f"block_offset must be >= 0, got {block_offset}")
    wanted = block_offset + num_blocks
    digest = hashlib.sha256()
    buf_ids: list[int] = []
    buf_keep: list[bool] = []
    out_ids: list[list[int]] = []
    out_keep: list[list[bool]] = []
    rows_seen = 0
    for text in rows:
        if len(out_ids) >= wanted:
            break
        ids, keep = tokens.encode(text)
        rows_seen += 1
        digest.update(text.encode("utf-8") + ROW_SEPARATOR)
        buf_ids.extend(ids)
        buf_ids.append(eos_id)
        buf_keep.extend(keep)
        buf_keep.append(False)
        while len(buf_ids) >= seq_len and len(out_ids) < wanted:
            block_keep = buf_keep[:seq_len]
            block_keep[0] = False
            out_ids.append(buf_ids[:seq_len])
            out_keep.append(block_keep)
            del buf_ids[:seq_len], buf_keep[:seq_len]
    if len(out_ids) < wanted:
        raise DataError(
            f"pack {pack or '?'}: only {len(out_ids)} blocks of {seq_len} tokens from "
            f"{rows_seen} rows, num_blocks={num_blocks} + block_offset={block_offset} requested",
            hint="Lower num_blocks, block_offset or seq_lens_csv, or add pack files.",
        )
    del out_ids[:block_offset], out_keep[:block_offset]
    return Blocks(
        input_ids=torch.tensor(out_ids, dtype=torch.long),  # [N, S]
        keep=torch.tensor(out_keep, dtype=torch.bool),  # [N, S]
        rows_seen=rows_seen,
        rows_sha256=digest.hexdigest(),
    )
