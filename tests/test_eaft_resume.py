"""eaft_single resumes a lost collection: interrupted mid-entry, rerun, same JSON (issue 14).

The interruption is a real exception raised from the `on_batch` callback after the state of
that batch was saved, as a session lost between two saves would leave it (minus the batches
after the last save, which the rerun redoes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from versa_kernels.eaft import collect
from versa_kernels.eaft.resume import STATE_SUFFIX
from versa_kernels.errors import ParameterError
from versa_kernels.fixtures import make_calib_packs, make_tiny_checkpoint

SEQ = 128
NUM_BLOCKS = 4
SAMPLE_POINTS = 20  # below the kept tokens of 3 blocks: the reservoir draws before the cut
TIMING = ("pack_wall_s", "tok_s_pred")  # wall-clock figures differ between any two runs


class SessionLost(RuntimeError):
    pass


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("eaft_resume")
    model = make_tiny_checkpoint(root / "model", seed=0)
    packs = make_calib_packs(root / "packs", rows=16, seed=0)
    return {"root": root, "model": model, "packs": [str(p) for p in packs]}


def _collect(fx, out_root: Path, **kw) -> Path:
    params = dict(
        model_id="tiny/base", model_path=str(fx["model"]), calib_pack_files=fx["packs"],
        seq_lens_csv=str(SEQ), num_blocks=NUM_BLOCKS, sample_points=SAMPLE_POINTS, top_k=4, run_id="r",
        out_root=str(out_root), save_every_blocks=1,
    )  # fmt: skip
    return collect(**{**params, **kw})


def _without_timing(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc["meta"].pop("timing")
    for pack in doc["packs"]:
        for entry in pack["seq"].values():
            for key in TIMING:
                entry.pop(key, None)
                entry["model"].pop(key, None)
    return doc


def _interrupt_at(pack: str, blocks: int):
    def on_batch(name: str, seq_len: int, done: int, total: int) -> None:
        if name == pack and done == blocks:
            raise SessionLost(f"session lost at {name}/{seq_len} block {done}/{total}")

    return on_batch


def _recorder(seen: list):
    return lambda name, seq_len, done, total: seen.append((name, done))


@pytest.fixture(scope="module")
def reference(fx) -> dict:
    return _without_timing(_collect(fx, fx["root"] / "ref"))


def test_interrupted_collection_resumes_to_the_same_json(fx, reference, tmp_path):
    second = Path(fx["packs"][1]).stem
    with pytest.raises(SessionLost):
        _collect(fx, tmp_path, on_batch=_interrupt_at(second, 3))
    state_path = tmp_path / "r" / f"tiny__base{STATE_SUFFIX}"
    assert state_path.is_file() and not (tmp_path / "r" / "tiny__base.json").exists()
    state = torch.load(state_path, weights_only=True)
    assert [e["pack"] for e in json.loads(state["finished"])] == [Path(fx["packs"][0]).stem]
    assert (state["partial"]["pack"], state["partial"]["done"]) == (second, 3)
    # The cut falls after the reservoir started replacing: its generator state must carry over.
    assert state["partial"]["stats"]["count"] > SAMPLE_POINTS

    seen: list = []
    path = _collect(fx, tmp_path, on_batch=_recorder(seen))
    # Only what was left ran: the first pack not at all, the second from its fourth block on.
    assert [d for name, d in seen if name == second] == [4]
    assert all(name != Path(fx["packs"][0]).stem for name, _ in seen)
    assert _without_timing(path) == reference  # histograms, reservoir, quantiles, sums: equal
    assert not state_path.exists()  # the JSON is written: the state is gone


def test_a_state_of_other_inputs_is_not_resumed(fx, reference, tmp_path):
    first = Path(fx["packs"][0]).stem
    with pytest.raises(SessionLost):
        _collect(fx, tmp_path, on_batch=_interrupt_at(first, 3))
    seen: list = []
    other = _collect(fx, tmp_path, sample_points=15, on_batch=_recorder(seen))
    assert [d for name, d in seen if name == first] == [1, 2, 3, 4]  # started over
    assert _without_timing(other)["packs"][0] != reference["packs"][0]

    # Changed weights under the same path: the state must not resume (it would mix models).
    model = make_tiny_checkpoint(tmp_path / "model", seed=0)
    with pytest.raises(SessionLost):
        _collect(fx, tmp_path, model_path=str(model), on_batch=_interrupt_at(first, 3))
    changed = make_tiny_checkpoint(tmp_path / "model_seed1", seed=1)
    for shard in changed.glob("*.safetensors"):  # same file names, other weights
        shutil.copyfile(shard, model / shard.name)
    seen.clear()
    _collect(fx, tmp_path, model_path=str(model), on_batch=_recorder(seen))
    assert [d for name, d in seen if name == first] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"save_every_s": -1}, "save_every_s"), ({"save_every_blocks": 1.5}, "save_every_blocks")],
)
def test_bad_save_settings_fail_before_work(fx, tmp_path, kw, name):
    with pytest.raises(ParameterError, match=f"{name}="):
        _collect(fx, tmp_path, **kw)
    assert not (tmp_path / "r").exists()
