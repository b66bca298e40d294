"""notebooks/eaft_single.ipynb run for real with papermill on the generated tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from versa_kernels.fixtures import make_calib_packs, make_tiny_checkpoint

from versa_runner.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "eaft_single.ipynb"


def test_parameters_cell_matches_task_schema():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code[0]["metadata"]["tags"] == ["parameters"]
    source = "".join(code[0]["source"])
    names = {
        line.split("=")[0].strip()
        for line in source.splitlines()
        if "=" in line and not line.startswith(" ")
    }
    expected = {p.name for p in get_task("eaft_single").params} | {"run_id"}
    assert names == expected


@pytest.mark.slow
def test_notebook_writes_the_json_and_prints_its_path(tmp_path):
    papermill = pytest.importorskip("papermill")
    model = make_tiny_checkpoint(tmp_path / "model")
    packs = make_calib_packs(tmp_path / "packs", rows=8)
    work = tmp_path / "job"  # the job's working directory is the output root
    work.mkdir()
    params = {
        "model_id": "tiny/nb",
        "model_path": str(model),
        "calib_pack_files": [str(p) for p in packs],
        "seq_lens_csv": [128],
        "num_blocks": 2,
        "sample_points": 50,
        "run_id": "nbrun",
    }
    out = papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), parameters=params, cwd=str(work),
        kernel_name="python3", progress_bar=False,
    )  # fmt: skip
    written = work / "artifacts" / "eaft_models" / "nbrun" / "tiny__nb.json"
    doc = json.loads(written.read_text())
    assert doc["meta"]["model_id"] == "tiny/nb" and doc["meta"]["seq_lens"] == [128]
    texts = [
        o.get("text", "")
        for c in out["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
    ]
    assert any("[+] Wrote artifacts/eaft_models/nbrun/tiny__nb.json" in t for t in texts)
    images = [
        o for c in out["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert images, "the histogram plot cell produced no image"
