"""The notebooks end to end under papermill (tiny settings), and the system files."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from kit import metrics, pipeline, submission

TINY = [
    "01.embedded_scale=0.25",
    "02.backbone_config=unit",
    "03.backbone_config=unit",
    "04.backbone_config=unit",
    "05.baseline_epochs=1",
    "06.bayes_iter=2",
    "06.bayes_init=2",
]
for nb in ("02", "03", "04"):
    TINY += [f"{nb}.steps=4", f"{nb}.batch_size=4", f"{nb}.crop_seconds=1.0", f"{nb}.checkpoint_every=2"]


def test_every_system_file_loads_and_names_real_notebooks(monkeypatch):
    monkeypatch.setenv("BEATS_CHECKPOINT", "/ckpt/BEATs_iter3.pt")
    names = pipeline.system_names()
    expected = {f"audiocc_{i}" for i in range(1, 5)} | {f"eat_asp_{i}" for i in range(1, 5)} | {"default"}
    assert expected <= set(names)
    for name in names:
        spec = pipeline.load_system(name)
        assert spec["steps"][0]["notebook"] == "01_data_preparation"
    first = pipeline.load_system("audiocc_1")["steps"][1]["params"]
    assert first["checkpoint"] == "/ckpt/BEATs_iter3.pt" and first["require_checkpoint"] is True
    monkeypatch.delenv("EAT_CHECKPOINT", raising=False)
    assert pipeline.load_system("eat_asp_2")["steps"][1]["params"]["checkpoint"] is None


def test_bad_system_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown system 'nope'"):
        pipeline.load_system("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - notebook: 09_nothing\n")
    with pytest.raises(ValueError, match="09_nothing"):
        pipeline.load_system(str(bad))
    with pytest.raises(ValueError, match="NOTEBOOK.PARAM=VALUE"):
        pipeline.run_system("default", "embedded", tmp_path / "run", overrides=["steps=3"])
    assert pipeline.main(["nope", "--run-dir", str(tmp_path / "r")]) == 2


@pytest.mark.filterwarnings("ignore")
def test_default_pipeline_end_to_end(tmp_path):
    """./run_all.sh's embedded default at a tiny scale: every notebook runs, results.csv holds every
    system with the baseline and the fusion, and the submission zip passes the validator."""
    run_dir = tmp_path / "run"
    overrides = TINY + [f"01.embedded_root={tmp_path / 'embedded'}", f"06.submission_dir={tmp_path / 'subs'}"]
    pipeline.run_system("default", "embedded", run_dir, overrides=overrides)
    for notebook in pipeline.notebook_paths():
        assert any(p.name.startswith(notebook.stem) for p in (run_dir / "notebooks").iterdir()), notebook.stem
    results = pd.read_csv(run_dir / "results.csv")
    overall = results[results["machine"] == "overall"].set_index("system")["hmean"]
    for system in ("baseline-MSE", "baseline-MAHALA", "fusion", "beats-knn-near", "eat-mahalanobis-residual"):
        assert system in overall.index
    assert overall.between(0, 1).all()
    zip_path = tmp_path / "subs" / "embedded_default.zip"
    expected = submission.expected_test_files(tmp_path / "embedded" / "eval_data" / "raw")
    assert submission.validate(zip_path, expected_files=expected) == []
    # the embedded evaluation ground truth scores the submitted system with the official metric
    scored = metrics.load_score_dir(run_dir / "submission" / "Kit_Embedded_task2_1")
    truth = metrics.load_ground_truth(tmp_path / "embedded" / "eval_ground_truth")
    table = metrics.section_metrics(metrics.attach_ground_truth(scored, truth))
    assert len(table) == len(expected)
    assert os.path.exists(run_dir / "figures" / "systems.png")

    # a papermill sweep over the scoring notebook: one run folder per value, the original untouched
    original = (run_dir / "scores" / "beats-knn-near.csv").read_bytes()
    params = {"branches": ["beats"], "backends": ["knn"], "channel_policies": ["near"], "baseline": False}
    outs = pipeline.sweep("05_scoring", {"knn_k": [1, 3]}, run_dir, tmp_path / "sweep", params=params)
    assert [p.name for p in outs] == ["knn_k=1", "knn_k=3"]
    k1, k3 = (pd.read_csv(p / "scores" / "beats-knn-near.csv")["score"] for p in outs)
    assert not k1.equals(k3)
    assert (run_dir / "scores" / "beats-knn-near.csv").read_bytes() == original
