"""Calibration packs and Harmony completion-only masks (issue 5, calibration data)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from versa_kernels.errors import DataError, ParameterError
from versa_kernels.harmony import assistant_content_spans, completion_mask
from versa_kernels.packs import fetch_pack_files, load_packs, parse_weights_csv, row_score

CONVERSATION = (
    "<|start|>system<|message|>You are terse.<|end|>"
    "<|start|>user<|message|>Add 2 and 3.<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Two plus three.<|end|>"
    "<|start|>assistant to=functions.add<|channel|>commentary <|constrain|>json"
    '<|message|>{"a": 2, "b": 3}<|call|>'
    '<|start|>functions.add to=assistant<|channel|>commentary<|message|>{"sum": 5}<|end|>'
    "<|start|>assistant<|channel|>final<|message|>It is 5.<|return|>"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer
    from versa_kernels.fixtures import build_small_harmony

    return AutoTokenizer.from_pretrained(build_small_harmony(tmp_path_factory.mktemp("tok")))


def _write_pack(path: Path, texts: list[object], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts}), path)
    return path


def _row(i: int, tag: str) -> str:
    return (
        f"<|start|>user<|message|>q{tag}{i}<|end|><|start|>assistant<|message|>a{tag}{i}<|return|>"
    )


def test_spans_cover_assistant_content_on_every_channel_and_tool_calls() -> None:
    spans = assistant_content_spans(CONVERSATION)
    contents = [CONVERSATION[s.start : s.end] for s in spans]
    assert contents == ["Two plus three.", '{"a": 2, "b": 3}', "It is 5."]
    assert [s.role for s in spans] == ["assistant", "assistant to=functions.add", "assistant"]


def test_completion_mask_keeps_exactly_the_assistant_content_tokens(tokenizer) -> None:
    ids, mask = completion_mask(CONVERSATION, tokenizer)
    kept = tokenizer.decode(ids[mask].tolist())
    assert kept == 'Two plus three.{"a": 2, "b": 3}It is 5.'
    # Headers, the tool's reply, user/system text and every terminator are never scored.
    dropped = tokenizer.decode(ids[~mask].tolist())
    for text in ("<|end|>", "<|call|>", "<|return|>", '{"sum": 5}', "Add 2 and 3.", "final"):
        assert text in dropped
    short_ids, short_mask = completion_mask(CONVERSATION, tokenizer, max_length=7)
    assert short_ids.tolist() == ids[-7:].tolist() and short_mask.tolist() == mask[-7:].tolist()


def test_row_without_assistant_text_masks_everything(tokenizer) -> None:
    _, mask = completion_mask("<|start|>user<|message|>hello<|end|>", tokenizer)
    assert not mask.any()


def test_sampling_is_deterministic_and_records_the_rows(tmp_path: Path) -> None:
    a = _write_pack(tmp_path / "a.parquet", [_row(i, "a") for i in range(30)])
    b = _write_pack(tmp_path / "b.parquet", [_row(i, "b") for i in range(10)])
    first = load_packs([a, b], num_rows=12, seed=7, strategy="per_file")
    again = load_packs([b, a], num_rows=12, seed=7, strategy="per_file")
    assert len(first.rows) == 12 and first.rows_sha256 == again.rows_sha256
    assert first.per_file_counts == {"a.parquet": 6, "b.parquet": 6}  # cap ceil(12/2) each
    other_seed = load_packs([a, b], num_rows=12, seed=8, strategy="per_file")
    assert other_seed.rows_sha256 != first.rows_sha256
    scores = [row_score(7, r.text) for r in first.rows]
    assert scores == sorted(scores)  # bottom-k by hash, in score order
    concat = load_packs([a, b], num_rows=12, seed=7, strategy="concat")
    every = sorted(
        [
            (row_score(7, _row(i, t)), _row(i, t))
            for t, n in (("a", 30), ("b", 10))
            for i in range(n)
        ]
    )
    assert [r.text for r in concat.rows] == [text for _, text in every[:12]]
    assert first.record()["rows_used"] == 12 and "text" not in str(first.record()["pack_files"])


def test_weighted_sampling_caps_follow_the_weights(tmp_path: Path) -> None:
    a = _write_pack(tmp_path / "a.parquet", [_row(i, "a") for i in range(40)])
    b = _write_pack(tmp_path / "b.parquet", [_row(i, "b") for i in range(40)])
    weights = parse_weights_csv("1,3", 2)
    sample = load_packs([a, b], num_rows=20, seed=1, strategy="weighted", weights=weights)
    assert sample.per_file_counts["b.parquet"] <= math.ceil(20 * 3 / 4)
    assert sample.per_file_counts["a.parquet"] <= math.ceil(20 * 1 / 4)
    assert sample.per_file_counts["b.parquet"] == 15 and sample.per_file_counts["a.parquet"] == 5
    with pytest.raises(ParameterError, match="2 weights for 3 pack files"):
        parse_weights_csv("1,3", 3)
    with pytest.raises(ParameterError, match="weighted needs calib_pack_weights_csv"):
        load_packs([a, b], num_rows=4, seed=1, strategy="weighted")
    with pytest.raises(ParameterError, match="one of per_file, weighted, concat"):
        load_packs([a, b], num_rows=4, seed=1, strategy="global")


def test_bad_packs_are_clear_errors(tmp_path: Path) -> None:
    good = _write_pack(tmp_path / "good.parquet", [_row(i, "g") for i in range(5)])
    no_col = _write_pack(tmp_path / "nocol.parquet", ["x"], column="content")
    with pytest.raises(DataError, match="has no 'text' column"):
        load_packs([good, no_col], num_rows=2, seed=0)
    no_asst = _write_pack(tmp_path / "noasst.parquet", ["<|start|>user<|message|>hi<|end|>", None])
    with pytest.raises(DataError, match="no row with assistant text"):
        load_packs([good, no_asst], num_rows=2, seed=0)
    with pytest.raises(DataError, match="only 5 usable rows for num_rows=9"):
        load_packs([good], num_rows=9, seed=0)
    held_out = load_packs(
        [good], num_rows=3, seed=0, exclude={("good.parquet", 0), ("good.parquet", 1)}
    )
    assert {r.row_i for r in held_out.rows} == {2, 3, 4}


def test_hub_fetch_honours_offline_mode_and_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_never_logged")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="could not fetch 'p.parquet'") as info:
        fetch_pack_files("someone/packs", ["p.parquet"], cache_dir=cache)
    assert "hf_secret_value_never_logged" not in str(info.value)
    # A populated cache (the hub's own layout) is used without any network access.
    commit = "0" * 40
    repo = cache / "datasets--someone--packs"
    _write_pack(repo / "snapshots" / commit / "p.parquet", [_row(0, "c")])
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (path,) = fetch_pack_files("someone/packs", ["p.parquet"], cache_dir=cache)
    assert load_packs([path], num_rows=1, seed=0).rows[0].text == _row(0, "c")


def test_completion_mask_with_the_real_o200k_harmony_tokenizer(tmp_path: Path) -> None:
    """The 20b's own tokenizer (built offline from bpe-openai): same kept text, real special ids."""
    from transformers import AutoTokenizer
    from versa_kernels.fixtures import build_o200k_harmony

    tok = AutoTokenizer.from_pretrained(build_o200k_harmony(tmp_path))
    ids, mask = completion_mask(CONVERSATION, tok)
    assert tok.decode(ids[mask].tolist()) == 'Two plus three.{"a": 2, "b": 3}It is 5.'
    specials = {
        200006,
        200007,
        200008,
        200005,
        200002,
        200012,
    }  # start end message channel return call
    assert specials <= set(ids.tolist()) and not (set(ids[mask].tolist()) & specials)
