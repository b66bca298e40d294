"""Completion-only token masks from the Harmony chat format (eaftreap_spec §2.1).

Harmony renders a conversation as messages ``<|start|>{header}<|message|>{content}{terminator}``
where the header is ``role`` or ``role<|channel|>channel ...`` and the terminator is the first of
``<|end|>``, ``<|return|>``, ``<|call|>`` after the content. Pruning scores only what the model
itself wrote: the content of assistant messages, on every channel (analysis, commentary, final),
tool calls (``assistant to=functions.x``) included. System, developer, user and tool messages,
all headers and the terminators themselves are never scored.

Easy to get wrong:
- Spans are found in *characters* and mapped to tokens through the fast tokenizer's offset
  mapping, so the mask works for any HF fast tokenizer, not only one with known special ids.
- A token is kept iff its character range overlaps a span; tokens with offset ``(0, 0)`` (added
  specials) are never kept.
- Tokenization uses ``add_special_tokens=False``: the text already carries its Harmony specials,
  and profiler and collectors must tokenize the same way (spec §11.1 #9).
- Truncation keeps the *tail* (left truncation): assistant turns sit at the end of a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

START = "<|start|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
TERMINATORS = ("<|end|>", "<|return|>", "<|call|>")
ASSISTANT_ROLE = "assistant"

__all__ = [
    "ContentSpan",
    "assistant_content_spans",
    "completion_mask",
    "mask_from_offsets",
]


@dataclass(frozen=True)
class ContentSpan:
    """Half-open character range ``[start, end)`` of one message's content, and its role."""

    start: int
    end: int
    role: str


def _message_spans(text: str) -> list[ContentSpan]:
    """Every complete message's content span, whatever the role."""
    spans: list[ContentSpan] = []
    i = 0
    while True:
        start = text.find(START, i)
        if start < 0:
            break
        header_start = start + len(START)
        msg = text.find(MESSAGE, header_start)
        if msg < 0:
            break
        header = text[header_start:msg]
        channel = header.find(CHANNEL)
        role = (header[:channel] if channel >= 0 else header).strip()
        content_start = msg + len(MESSAGE)
        ends = [p for p in (text.find(t, content_start) for t in TERMINATORS) if p >= 0]
        if not ends:
            break  # an unterminated final message is not a complete completion: not scored
        end = min(ends)
        spans.append(ContentSpan(content_start, end, role))
        i = end + 1
    return spans


def _is_assistant(role: str) -> bool:
    # "assistant to=functions.lookup" is a tool call written by the assistant: scored.
    return role == ASSISTANT_ROLE or role.startswith(ASSISTANT_ROLE + " ")


def assistant_content_spans(text: str) -> list[ContentSpan]:
    """Character spans of assistant message content (all channels, tool calls included)."""
    return [s for s in _message_spans(text) if _is_assistant(s.role)]


def mask_from_offsets(offsets: list[tuple[int, int]], spans: list[ContentSpan]) -> list[bool]:
    """True for tokens whose ``(cs, ce)`` character range overlaps any span."""
    mask: list[bool] = []
    for cs, ce in offsets:
        if cs == 0 and ce == 0:
            mask.append(False)
            continue
        mask.append(any(ce > s.start and cs < s.end for s in spans))
    return mask


def completion_mask(
    text: str, tokenizer: Any, *, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``text`` and a bool mask, True for tokens inside assistant content.

    Args:
        text: one Harmony-formatted row.
        tokenizer: any HF *fast* tokenizer (it must return an offset mapping).
        max_length: keep at most this many tokens, dropping from the left (the tail holds the
            assistant turns).

    Returns:
        ``(input_ids [T] int64, mask [T] bool)``; the mask is all False when the row has no
        assistant content.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("completion_mask needs a fast tokenizer (offset mapping); got a slow one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    mask = mask_from_offsets(offsets, assistant_content_spans(text))
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[-max_length:], mask[-max_length:]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
