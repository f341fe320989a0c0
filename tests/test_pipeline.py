"""The notebooks end to end under papermill (tiny settings), and the recipes."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from kit import metrics, pipeline, submission

TINY = [
    "01.embedded_scale=0.25",
    "09.baseline_epochs=1",
    "10.bayes_iter=2",
    "10.bayes_init=2",
]
TINY += ["07.training.backbone_config=unit", "07.training.steps=4", "07.training.batch_size=4"]
TINY += ["05.training.steps=2", "05.training.batch_size=4", "05.training.crop_seconds=1.0"]


def test_every_recipe_loads_and_names_real_notebooks(monkeypatch):
    monkeypatch.setenv("BEATS_CHECKPOINT", "/ckpt/BEATs_iter3.pt")
    names = pipeline.recipe_names()
    expected = {f"audiocc_{i}" for i in range(1, 5)} | {f"eat_asp_{i}" for i in range(1, 5)} | {"default"}
    assert expected <= set(names)
    for name in names:
        spec = pipeline.load_recipe(name)
        assert spec["steps"][0]["notebook"] == "01_data_preparation"
    first = pipeline.load_recipe("audiocc_1")["steps"][1]["params"]
    assert first["checkpoint"] == "/ckpt/BEATs_iter3.pt" and first["require_checkpoint"] is True
    monkeypatch.delenv("EAT_CHECKPOINT", raising=False)
    assert pipeline.load_recipe("eat_asp_2")["steps"][1]["params"]["checkpoint"] is None


def test_bad_recipe_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown recipe 'nope'"):
        pipeline.load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - notebook: 09_nothing\n")
    with pytest.raises(ValueError, match="09_nothing"):
        pipeline.load_recipe(str(bad))
    with pytest.raises(ValueError, match="NOTEBOOK.PARAM=VALUE"):
        pipeline.run_recipe("default", "embedded", tmp_path / "run", overrides=["steps=3"])
    assert pipeline.main(["nope", "--run-dir", str(tmp_path / "r")]) == 2


@pytest.mark.filterwarnings("ignore")
@pytest.mark.skipif(
    not os.environ.get("KIT_SLOW_TESTS"),
    reason="the benchmark recipes take 2.5 and 8 minutes even at this tiny scale (every branch x backend x "
    "channel policy); KIT_SLOW_TESTS=1 runs them (kept out of the default run so CI stays under 20 minutes)",
)
@pytest.mark.parametrize("recipe", ["benchmark", "benchmark_pretrained"])
def test_the_benchmark_recipes_run_end_to_end(recipe, tmp_path, backbone_fixtures, monkeypatch):
    """The recipes `kit.tools.benchmark` runs over seeds, at a tiny scale: every notebook, every
    branch, backend and channel policy they state, and the systems their fusion names."""
    monkeypatch.setenv(
        "EFFICIENTAT_CHECKPOINT", str(backbone_fixtures / "efficientat" / "mn04_as_mAP_432.pt")
    )
    few = [f"{nb}.training.{key}" for nb in ("02", "03", "04") for key in ("steps=2", "batch_size=4")]
    overrides = (
        TINY + few + [f"01.embedded_root={tmp_path / 'embedded'}", f"10.submission_dir={tmp_path / 'subs'}"]
    )
    spec = pipeline.load_recipe(recipe)
    present = {step["notebook"][:2] for step in spec["steps"]}
    overrides = [o for o in overrides if o[:2] in present]  # the tiny settings of its own notebooks
    run_dir = pipeline.run_recipe(recipe, "embedded", tmp_path / "run", overrides=overrides)
    for step in spec["steps"]:
        assert any(p.name.startswith(step["notebook"]) for p in (run_dir / "notebooks").iterdir()), step
    systems = set(pd.read_csv(run_dir / "results.csv")["system"])
    scoring_step, fusion_step = spec["steps"][-2]["params"], spec["steps"][-1]["params"]
    assert set(fusion_step["fuse"]) <= systems and {"fusion", "fusion-mean"} <= systems
    for branch in scoring_step["branches"]:  # every branch and backend scored (BEAM: per-band branches)
        for backend in scoring_step["backends"]:
            if backend != "beam" or branch.endswith(("_rdp", "_bmean")):
                assert f"{branch}-{backend}-near" in systems
    for policy in scoring_step["channel_policies"]:  # every policy, on the branches that have its channels
        assert any(system.endswith(f"-{policy}") for system in systems), policy


def write_notebook(path, parameters: str) -> None:
    """A notebook whose only cell is a papermill ``parameters`` cell."""
    cell = {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": parameters, "outputs": []}
    path.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


@pytest.fixture()
def fake_recipe(tmp_path, monkeypatch):
    """notebooks/ with three small notebooks and a recipe ``fake`` that runs 02 twice."""
    notebooks = tmp_path / "notebooks"
    (notebooks / "recipes").mkdir(parents=True)
    common = 'data_root = "embedded"\nrun_dir = "runs/notebook"\n'
    write_notebook(notebooks / "01_prepare.ipynb", common + "scale = 1.0\n")
    write_notebook(
        notebooks / "02_train.ipynb",
        common + 'name = "model"\nseed = 0\nchannels = ["near", "far"]\ncheckpoint = None\n'
        'training = {"steps": 300, "lr": 0.001}  # over the library defaults\nextraction = {}\n',
    )
    write_notebook(notebooks / "03_score.ipynb", common + "knn_k = 1\n")
    (notebooks / "recipes" / "fake.yaml").write_text(
        "description: two training runs\n"
        "steps:\n"
        "  - notebook: 01_prepare\n"
        "  - notebook: 02_train\n"
        "    params: {name: a, training: {lr: 5.0e-5, batch_size: 16}}\n"
        "  - notebook: 02_train\n"
        "    params: {name: b}\n"
        "  - notebook: 03_score\n"
    )
    monkeypatch.setattr(pipeline, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(pipeline, "RECIPES", notebooks / "recipes")
    return "fake"


def params_of(plan, notebook):
    return [step["params"] for step in plan if step["notebook"].startswith(notebook)]


def test_set_replaces_a_parameter_and_parses_yaml(fake_recipe, tmp_path):
    overrides = ["02.seed=5", "2.channels=[near]", "02_train.checkpoint=null", "03.knn_k=3"]
    plan = pipeline.plan_recipe(fake_recipe, "embedded", tmp_path / "run", overrides=overrides)
    for params in params_of(plan, "02"):  # every step of notebook 02
        assert params["seed"] == 5 and params["channels"] == ["near"] and params["checkpoint"] is None
    assert params_of(plan, "03") == [
        {"data_root": "embedded", "run_dir": str((tmp_path / "run").resolve()), "knn_k": 3}
    ]
    assert params_of(plan, "01")[0] == {"data_root": "embedded", "run_dir": str((tmp_path / "run").resolve())}
    assert [step["target"].name for step in plan] == [
        "01_prepare.ipynb",
        "02_train-a.ipynb",
        "02_train-b.ipynb",
        "03_score.ipynb",
    ]


def test_set_with_keys_merges_into_a_mapping_parameter(fake_recipe, tmp_path):
    overrides = ["02.training.steps=50", "02.extraction.windows.seconds=10", "02.training.lr=1e-4"]
    first, second = params_of(
        pipeline.plan_recipe(fake_recipe, "embedded", tmp_path, overrides=overrides), "02"
    )
    # the recipe's own mapping keeps its other keys
    assert first["training"] == {"lr": 1e-4, "batch_size": 16, "steps": 50}
    # a step without the mapping starts from the notebook's default, so its other keys stay too
    assert second["training"] == {"steps": 50, "lr": 1e-4}
    assert first["extraction"] == second["extraction"] == {"windows": {"seconds": 10}}
    # a plan does not change the loaded recipe, nor the next plan
    assert pipeline.load_recipe(fake_recipe)["steps"][1]["params"]["training"] == {
        "lr": 5e-5,
        "batch_size": 16,
    }
    again = params_of(pipeline.plan_recipe(fake_recipe, "embedded", tmp_path), "02")
    assert [p.get("training") for p in again] == [{"lr": 5e-5, "batch_size": 16}, None]


def test_set_replacing_a_mapping_and_then_a_key(fake_recipe, tmp_path):
    overrides = ["02.training={steps: 9}", "02.training.lr=0.5"]
    plan = pipeline.plan_recipe(fake_recipe, "embedded", tmp_path, overrides=overrides)
    assert [p["training"] for p in params_of(plan, "02")] == [{"steps": 9, "lr": 0.5}] * 2


def test_recipes_expand_variables_in_keys_and_read_exponents_as_numbers(fake_recipe, tmp_path, monkeypatch):
    recipe = pipeline.RECIPES / "labels.yaml"
    recipe.write_text(
        "steps:\n"
        "  - notebook: 02_train\n"
        '    params: {training: {lr: 1e-4}, extraction: {"${TEAM_LABEL:-Repro_Kit}_task2_1": "${NOPE}"}}\n'
    )
    monkeypatch.delenv("TEAM_LABEL", raising=False)
    monkeypatch.delenv("NOPE", raising=False)
    params = pipeline.load_recipe("labels")["steps"][0]["params"]
    assert params["training"] == {"lr": 1e-4}
    assert params["extraction"] == {"Repro_Kit_task2_1": None}
    monkeypatch.setenv("TEAM_LABEL", "Smith_UNI")
    assert pipeline.load_recipe("labels")["steps"][0]["params"]["extraction"] == {"Smith_UNI_task2_1": None}
    overrides = ["02.training.lr=2e-5", '02.extraction.note="1e-4"']  # quoted: stays a string
    (planned,) = params_of(pipeline.plan_recipe("labels", "embedded", tmp_path, overrides=overrides), "02")
    assert planned["training"] == {"lr": 2e-5} and planned["extraction"]["note"] == "1e-4"


def test_bad_overrides_and_only_are_named(fake_recipe, tmp_path):
    def plan(overrides=(), only=None):
        return pipeline.plan_recipe(fake_recipe, "embedded", tmp_path, overrides=list(overrides), only=only)

    with pytest.raises(ValueError, match="parameter seed is 0, not a mapping"):
        plan(["02.seed.x=1"])
    with pytest.raises(ValueError, match="02_train has no parameter 'setps'.*seed, channels"):
        plan(["02.setps=3"])
    with pytest.raises(ValueError, match="notebook '04' is not part of recipe fake.*01_prepare, 02_train"):
        plan(["04.steps=3"])
    for text in ("02.seed", "02=3", ".seed=3", "02..x=1", "02.training.=1"):
        with pytest.raises(ValueError, match="NOTEBOOK.PARAM=VALUE"):
            plan([text])
    with pytest.raises(ValueError, match="not valid YAML"):
        plan(["02.channels=[near"])
    with pytest.raises(ValueError, match="--only 04: not a notebook of recipe fake"):
        plan(only=["01", "04"])
    assert [step["label"] for step in plan(only=["03", "1"])] == ["01_prepare", "03_score"]
    assert [step["label"] for step in plan(only=["02_train"])] == ["02_train-a", "02_train-b"]


def test_run_recipe_executes_the_plan_in_order(fake_recipe, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        pipeline,
        "_execute_notebook",
        lambda src, dst, params, kernel, log: calls.append((src.name, dst, params, kernel)),
    )
    run_dir = pipeline.run_recipe(
        fake_recipe, "/data", tmp_path / "run", overrides=["03.knn_k=2"], only=["02", "03"], kernel="k"
    )
    assert run_dir == (tmp_path / "run").resolve() and (run_dir / "notebooks").is_dir()
    assert [(c[0], c[1].name, c[3]) for c in calls] == [
        ("02_train.ipynb", "02_train-a.ipynb", "k"),
        ("02_train.ipynb", "02_train-b.ipynb", "k"),
        ("03_score.ipynb", "03_score.ipynb", "k"),
    ]
    assert calls[2][2] == {"data_root": "/data", "run_dir": str(run_dir), "knn_k": 2}


@pytest.mark.filterwarnings("ignore")
def test_default_pipeline_end_to_end(tmp_path, backbone_fixtures, monkeypatch):
    """./run_all.sh's embedded default at a tiny scale: every notebook runs, results.csv holds every
    system with the baseline and the fusion, and the submission zip passes the validator."""
    # the EfficientAT release the default downloads once, here from the fixtures (offline)
    monkeypatch.setenv(
        "EFFICIENTAT_CHECKPOINT", str(backbone_fixtures / "efficientat" / "mn04_as_mAP_432.pt")
    )
    run_dir = tmp_path / "run"
    authors = tmp_path / "authors.yaml"
    authors.write_text(
        (pipeline.REPO / "authors.example.yaml")
        .read_text()
        .replace("jane.doe@example.org", "jane.doe@uni.edu")
    )
    overrides = TINY + [
        f"01.embedded_root={tmp_path / 'embedded'}",
        f"10.submission_dir={tmp_path / 'subs'}",
        f"10.authors={authors}",  # the zip is written once the authors are known
    ]
    pipeline.run_recipe("default", "embedded", run_dir, overrides=overrides)
    for step in pipeline.load_recipe("default")["steps"]:
        assert any(p.name.startswith(step["notebook"]) for p in (run_dir / "notebooks").iterdir()), step
    results = pd.read_csv(run_dir / "results.csv")
    overall = results[results["machine"] == "overall"].set_index("system")["hmean"]
    for system in (
        "baseline-MSE",
        "baseline-MAHALA",
        "fusion",
        "cnn-knn-auto",
        "logmel-mahalanobis-auto",
        "mn04-mahalanobis-auto",
        "mn04_frozen_bmean-mahalanobis-auto",
    ):
        assert system in overall.index
    for canceller in ("w1", "wl"):  # every canceller of the recipe has its row on stereo data
        assert f"logmel-mahalanobis-{canceller}" in overall.index and f"cnn-knn-{canceller}" in overall.index
    assert overall.between(0, 1).all()
    zip_path = tmp_path / "subs" / "embedded_default.zip"
    expected = submission.expected_test_files(tmp_path / "embedded" / "eval_data" / "raw")
    assert submission.validate(zip_path, expected_files=expected) == []
    # the embedded evaluation ground truth scores the submitted system with the official metric
    (label_dir,) = [p for p in (run_dir / "submission").iterdir() if p.is_dir()]  # the one system submitted
    scored = metrics.load_score_dir(label_dir)
    truth = metrics.load_ground_truth(tmp_path / "embedded" / "eval_ground_truth")
    table = metrics.section_metrics(metrics.attach_ground_truth(scored, truth))
    assert len(table) == len(expected)
    assert os.path.exists(run_dir / "figures" / "systems.png")
    # the development scores in the official format: the metrics command reads labels from their names
    assert metrics.main([str(run_dir / "dev_scores"), "--system", "fusion"]) == 0

    # a papermill sweep over the scoring notebook: one run folder per value, the original untouched
    original = (run_dir / "scores" / "logmel-knn-near.csv").read_bytes()
    params = {
        "branches": ["logmel"],
        "backends": ["knn"],
        "channel_policies": ["near"],
        "with_baseline": False,
    }
    outs = pipeline.sweep("09_scoring", {"knn_k": [1, 3]}, run_dir, tmp_path / "sweep", params=params)
    assert [p.name for p in outs] == ["knn_k=1", "knn_k=3"]
    k1, k3 = (pd.read_csv(p / "scores" / "logmel-knn-near.csv")["score"] for p in outs)
    assert not k1.equals(k3)
    assert (run_dir / "scores" / "logmel-knn-near.csv").read_bytes() == original
