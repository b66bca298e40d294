"""Offline text for the MoE testbeds, and which of it is held out from training.

Sources are Python's own: every non-test stdlib ``.py`` file (raw code, plus Harmony conversations
about its public functions and classes, built by ``train_tiny_moe.conversations``) and the
language-reference topics of ``pydoc_data.topics`` (raw text, plus a Harmony conversation that
explains the topic). Every source has a stable name (the file's path under the stdlib root, or
``topic:<name>``).

The 32-expert testbed holds a source out of training by a hash of its name
(``held_out(name)``), not by its position in a sorted list: the model is trained on the GPU box's
Python 3.12 and evaluated anywhere, and a positional rule would shift with every file a Python
version adds or removes. The held-out sources split again by a second hash into an evaluation
half and a calibration half (``eval_side``), so calibration rows and evaluation text never share
a source. The trained tiny model (scripts/train_tiny_moe.py) predates this and holds out every
VAL_EVERY-th sorted file; ``tiny_held_out`` reproduces that split.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny_moe  # noqa: E402

HOLDOUT_MOD = 8  # one source in 8 is never trained on
TOPIC_MAX_CHARS = 1500  # reference topics run to 20k chars; an answer keeps the first part

__all__ = [
    "HOLDOUT_MOD",
    "Source",
    "eval_side",
    "held_out",
    "stdlib_root",
    "stdlib_sources",
    "tiny_held_out",
    "tiny_trained",
]


@dataclass(frozen=True)
class Source:
    """One source: raw text (trained on as is) and its Harmony conversations."""

    name: str
    text: str
    conversations: tuple[str, ...]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(name: str, mod: int, salt: str) -> int:
    digest = hashlib.blake2b(f"{salt}\n{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % mod


def held_out(name: str) -> bool:
    """True for the sources the testbed never trains on (1 in HOLDOUT_MOD, by name hash)."""
    return _bucket(name, HOLDOUT_MOD, "holdout") == 0


def eval_side(name: str) -> bool:
    """Among held-out sources: True = evaluation text, False = calibration pool."""
    return _bucket(name, 2, "eval") == 0


def _topic_conversation(name: str, text: str) -> str:
    answer = text.strip()[:TOPIC_MAX_CHARS]
    return (
        "<|start|>system<|message|>You are a helpful Python assistant.<|end|>"
        f"<|start|>user<|message|>Explain `{name}` from the Python language reference.<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>The user asks about the reference "
        f"topic {name}. I will quote the relevant part.<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>"
    )


def stdlib_sources() -> list[Source]:
    """Every stdlib file and reference topic of this Python, sorted by name."""
    root = stdlib_root()
    sources = []
    for path in train_tiny_moe.stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        convs = tuple(train_tiny_moe.conversations(path, root))
        sources.append(Source(str(path.relative_to(root)), text, convs))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for topic in sorted(topics):
        name = f"topic:{topic}"
        sources.append(Source(name, topics[topic], (_topic_conversation(topic, topics[topic]),)))
    return sorted(sources, key=lambda s: s.name)


def tiny_held_out() -> list[Source]:
    """The tiny model's held-out files (every VAL_EVERY-th sorted file), conversations only."""
    root = stdlib_root()
    return [
        Source(str(p.relative_to(root)), "", tuple(train_tiny_moe.conversations(p, root)))
        for p in train_tiny_moe.stdlib_files()[:: train_tiny_moe.VAL_EVERY]
    ]


def tiny_trained() -> list[Source]:
    """The files the tiny model trained on (all but every VAL_EVERY-th), conversations only."""
    root = stdlib_root()
    files = train_tiny_moe.stdlib_files()
    return [
        Source(str(p.relative_to(root)), "", tuple(train_tiny_moe.conversations(p, root)))
        for i, p in enumerate(files)
        if i % train_tiny_moe.VAL_EVERY
    ]
