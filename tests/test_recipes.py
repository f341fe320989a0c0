"""The eight report recipes as their files state them: the effective settings of every step, and each
recipe end to end (./run_all.sh RECIPE) with official-format checkpoints, on a small generated dataset."""

from __future__ import annotations

import copy
import shutil

import pandas as pd
import pytest
import yaml

from kit import manifest, metrics, pipeline, submission, synth, train

REPORT_RECIPES = [f"audiocc_{i}" for i in range(1, 5)] + [f"eat_asp_{i}" for i in range(1, 5)]
VARIANT_RECIPES = {"audiocc_1_w1": "audiocc_1", "eat_asp_4_w1": "eat_asp_4"}  # toolkit additions: w1 for near
NABEATS_RECIPES = ["nabeats", "nabeats_finetune"]  # MERL's NA-BEATs: the frozen release and a fine-tuned one
PUBLIC_2026_RECIPES = ["beats_lora_w1"]  # the strongest public 2026 recipe (kasahart/asd-experiments)
CHECKPOINTS = {"beats": "beats_release.pt", "eat": "eat_fairseq.pt", "fisher": "fisher.pt"}
AUTHOR = {
    "lastname": "Tester",
    "firstname": "Ada",
    "email": "ada.tester@tu-berlin.de",
    "affiliation": {"institution": "TU Berlin", "location": "Berlin, Germany"},
}


@pytest.fixture()
def checkpoints(backbone_fixtures, monkeypatch):
    for backbone, file in CHECKPOINTS.items():
        monkeypatch.setenv(f"{backbone.upper()}_CHECKPOINT", str(backbone_fixtures / file))
    nabeats = backbone_fixtures.parent / "nabeats"  # the release format: fusion layers + their base file
    monkeypatch.setenv("NABEATS_CHECKPOINT", str(nabeats / "nabeats_tiny_seed0.ckpt"))
    monkeypatch.setenv("NABEATS_BASE", str(nabeats / "BEATs_iter3.pt"))


def _file_steps(recipe: str) -> list[dict]:
    return pipeline.load_recipe(recipe)["steps"]


def _compact(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


@pytest.mark.parametrize("recipe", REPORT_RECIPES)
def test_effective_settings_are_the_files_and_the_reports(recipe, checkpoints, capsys):
    """Every value a recipe sets is the value its step runs with (the notebook defaults fill the
    rest, printed here), and the report's own settings hold (see the comments in each file)."""
    effective = pipeline.effective_settings(recipe)
    file_steps = _file_steps(recipe)
    lines = [f"== {recipe}"]
    for step, stated in zip(effective, file_steps):
        params, given = step["params"], stated["params"]
        for key, value in given.items():
            if key in ("training", "extraction"):
                for field, wanted in value.items():
                    have = params[key][field]
                    assert have == (list(wanted) if isinstance(wanted, tuple) else wanted), (
                        recipe,
                        key,
                        field,
                    )
            else:
                assert params[key] == value, (recipe, key)
        if step["notebook"].startswith(("02", "03", "04")):
            lines.append(f"{step['notebook']} {params['name']}: training {_compact(params['training'])}")
            lines.append(f"{step['notebook']} {params['name']}: extraction {_compact(params['extraction'])}")
        elif step["notebook"].startswith(("09", "10")):
            shown = {
                k: v for k, v in params.items() if k not in ("repo_url", "drive_root", "data_root", "run_dir")
            }
            shown.pop("submission_meta", None)
            lines.append(f"{step['notebook']}: {_compact(shown)}")
    print("\n".join(lines))

    scoring = next(s["params"] for s in file_steps if s["notebook"] == "09_scoring")
    assert {"backends", "channel_policies", "separate_domains", "smote"} <= set(
        scoring
    )  # explicit, not inherited
    assert scoring["separate_domains"] is False  # both reports: one reference set per machine and section
    fine_tuning = [s["params"] for s in effective if s["notebook"].startswith(("02", "03", "04"))]
    if recipe.startswith("eat_asp"):
        (eat,) = fine_tuning
        t, x = eat["training"], eat["extraction"]
        assert (t["lr"], t["head_lr_scale"], t["batch_size"], t["steps"]) == (5e-5, 1.0, 16, 20000)
        assert (t["label_scheme"], t["channels"], t["head"], t["loss"]) == (
            "composite",
            ["near", "far"],
            "asp",
            "arcface",
        )
        assert (t["length_mode"], t["crop_seconds"], t["mask_padding"]) == ("pad_or_cut", 16.0, False)
        assert t["backbone_options"] == {"target_length": 1600}
        assert (x["length_mode"], x["seconds"], x["mask_padding"], x["window_seconds"]) == (
            "pad_or_cut",
            16.0,
            False,
            None,
        )
        assert t["mode"] == ("full" if recipe in ("eat_asp_1", "eat_asp_3") else "lora")
        assert scoring["channel_policies"] == (["mean"] if recipe in ("eat_asp_1", "eat_asp_2") else ["near"])
        assert scoring["knn_k"] == 1 and scoring["backends"] == ["knn"]
    else:
        for branch in fine_tuning:  # assumption stated in the files: windows of the training crop length
            assert branch["extraction"]["window_seconds"] == branch["training"]["crop_seconds"]
            assert branch["training"]["loss"] in ("arcface", "subcenter", "adacos")
        assert len(fine_tuning) == {"audiocc_1": 1, "audiocc_2": 1, "audiocc_3": 3, "audiocc_4": 7}[recipe]
        assert scoring["channel_policies"] == ["near"]


@pytest.mark.parametrize("variant", VARIANT_RECIPES)
def test_a_canceller_variant_is_its_report_recipe_with_w1_for_near(variant, checkpoints):
    """Every setting of a variant is its report recipe's, except the channel: w1 where near was."""
    base = pipeline.effective_settings(VARIANT_RECIPES[variant])
    mine = pipeline.effective_settings(variant)
    assert [s["notebook"] for s in mine] == [s["notebook"] for s in base]
    (trained,) = [s["params"]["name"] for s in base if "training" in s["params"] and s["params"]["training"]]
    rename = {trained: f"{trained}_w1", f"{trained}-knn-near": f"{trained}_w1-knn-w1"}

    def swapped(value):
        if isinstance(value, str):
            return rename.get(value, value)
        if isinstance(value, list):
            return [swapped(v) for v in value]
        if isinstance(value, dict):
            return {swapped(k): swapped(v) for k, v in value.items()}
        return value

    changed = {
        ("training", "channels"): ["w1", "far"],
        ("extraction", "channels"): ["w1"],
        ("channel_policies",): ["w1"],
        ("baseline_channels",): ["near", "w1"],
        ("submission_name",): variant,
    }
    for theirs, ours in zip(base, mine):
        expected = swapped(copy.deepcopy(theirs["params"]))
        got = copy.deepcopy(ours["params"])
        for path, value in changed.items():
            holder_expected, holder_got = expected, got
            for key in path[:-1]:
                holder_expected, holder_got = holder_expected.get(key) or {}, holder_got.get(key) or {}
            if path[-1] in holder_got and holder_got[path[-1]] != holder_expected.get(path[-1]):
                assert holder_got[path[-1]] == value, (variant, path)
                holder_got[path[-1]] = holder_expected[path[-1]]
        got.pop("submission_meta", None), expected.pop("submission_meta", None)
        assert got == expected, (variant, ours["notebook"])
    assert (
        "w1"
        in pipeline.load_recipe(variant)["steps"][-1]["params"]["submission_meta"]["system"]["description"][
            "front_end"
        ]
    )


def test_a_typo_in_a_recipe_is_named(tmp_path, checkpoints):
    spec = yaml.safe_load((pipeline.RECIPES / "audiocc_1.yaml").read_text())
    broken = copy.deepcopy(spec)
    broken["steps"][1]["params"]["training"]["learning_rate"] = 1e-4
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['learning_rate'\]"):
        pipeline.effective_settings(str(tmp_path / "a.yaml"))
    broken = copy.deepcopy(spec)
    broken["steps"][2]["params"]["knn"] = 3
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match=r"step 09_scoring: unknown parameter\(s\) \['knn'\]"):
        pipeline.effective_settings(str(tmp_path / "b.yaml"))


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Three machine types of the embedded generator (one development, two evaluation: AdaCos needs three
    section classes), the fewest clips."""
    root = tmp_path_factory.mktemp("small") / "data"
    synth.generate(root, scale=0.1, seed=0, machines=["SynValve", "SynBlower", "SynGearbox"], progress=False)
    return root


@pytest.fixture()
def authors(tmp_path, monkeypatch):
    path = tmp_path / "authors.yaml"
    path.write_text(yaml.safe_dump([AUTHOR]))
    monkeypatch.setenv(submission.AUTHORS_VARIABLE, str(path))
    monkeypatch.setenv("TEAM_LABEL", "Tester_TUB")


def _few(recipe: str, out) -> list[str]:
    """Steps, clips and epochs overridden to a few; every other setting as the recipe states."""
    notebooks = {step["notebook"][:2] for step in _file_steps(recipe)}
    overrides = ["09.baseline_epochs=1", f"10.submission_dir={out}"]
    overrides += [
        f"{nb}.training.{k}={v}"
        for nb in ("02", "03", "04", "06")
        if nb in notebooks
        for k, v in (("steps", 2), ("batch_size", 2), ("warmup_steps", 1), ("checkpoint_every", 1))
    ]
    if "bayes" in str(pipeline.load_recipe(recipe)):
        overrides += ["10.bayes_iter=1", "10.bayes_init=1"]
    return overrides


def _dev_files_reproduce_results(run_dir):
    """The official-format development files score, with kit.metrics, exactly as results.csv says."""
    results = pd.read_csv(run_dir / "results.csv")
    for folder in sorted((run_dir / "dev_scores").iterdir()):
        scores = metrics.labels_from_file_names(metrics.load_score_dir(folder))
        table = metrics.results_table({folder.name: scores})
        mine = results[results["system"] == folder.name].drop(columns="note").reset_index(drop=True)
        pd.testing.assert_frame_equal(
            table[mine.columns].reset_index(drop=True), mine, check_dtype=False, atol=1e-12
        )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "recipe", REPORT_RECIPES + list(VARIANT_RECIPES) + NABEATS_RECIPES + PUBLIC_2026_RECIPES
)
def test_each_report_recipe_runs_end_to_end(recipe, small_root, checkpoints, authors, tmp_path):
    run_dir = pipeline.run_recipe(
        recipe, str(small_root), tmp_path / "run", overrides=_few(recipe, tmp_path / "subs")
    )
    results = pd.read_csv(run_dir / "results.csv")
    submitted = pipeline.load_recipe(recipe)["steps"][-1]["params"]["submit"]
    (label,) = submitted
    assert label.startswith("Tester_TUB_task2_")
    assert set(submitted.values()) <= set(results["system"]) and {"baseline-MSE", "baseline-MAHALA"} <= set(
        results["system"]
    )
    zip_path = tmp_path / "subs" / f"{recipe}.zip"
    expected = submission.expected_test_files(small_root / "eval_data" / "raw")
    assert submission.validate(zip_path, expected_files=expected) == []
    meta = yaml.safe_load((run_dir / "submission" / label / f"{label}.meta.yaml").read_text())
    run = manifest.read(run_dir)
    fused = run["fusion"]["systems"]
    assert meta["system"]["description"]["ensemble_method_subsystem_count"] == (
        len(fused) if submitted[label] == "fusion" else 1
    )
    used = fused if submitted[label] == "fusion" else [submitted[label]]
    branches = {b for b in run["branches"] if any(system.startswith(f"{b}-") for system in used)}
    baseline = 0  # a fusion with the autoencoder baseline (the nabeats recipes) also counts its models
    if submitted[label] == "fusion" and any(system.startswith("baseline-") for system in fused):
        baseline = run["scores"]["baseline_parameters"]
    assert meta["system"]["complexity"]["total_parameters"] == baseline + sum(
        run["branches"][b]["parameters"] for b in branches
    )
    assert meta["submission"]["authors"][0]["email"] == AUTHOR["email"]
    assert meta["submission"]["name"].startswith(
        ("AudioCC reproduction", "EAT-ASP reproduction", "NA-BEATs reproduction", "BEATs LoRA on W1")
    )
    assert all(
        1.0 < v <= 100.0
        for m in meta["results"]["development_dataset"].values()
        for v in m.values()
        if v > 1.0
    )
    assert run["submission"]["zip"] == str(zip_path.absolute())
    _dev_files_reproduce_results(run_dir)
    for name, entry in run["branches"].items():  # the branches' effective settings are recorded
        if entry["training"].get("finetune") is False:  # a frozen branch (nabeats): nothing was trained
            continue
        saved = train.TrainConfig.from_dict(entry["training"])
        assert saved.name == entry.get("band_of", name) and saved.steps == 2  # a band branch: its model's


@pytest.mark.filterwarnings("ignore")
def test_a_development_only_root_gives_results_and_says_why_there_is_no_submission(
    small_root, checkpoints, authors, tmp_path
):
    root = tmp_path / "dev_only"
    shutil.copytree(small_root / "dev_data", root / "dev_data")
    run_dir = pipeline.run_recipe(
        "audiocc_1", str(root), tmp_path / "run", overrides=_few("audiocc_1", tmp_path / "subs")
    )
    assert "beats_arcface-knn-near" in set(pd.read_csv(run_dir / "results.csv")["system"])
    assert "no evaluation test clips" in manifest.read(run_dir)["submission"]["skipped"]
    assert not (tmp_path / "subs").exists()


@pytest.mark.parametrize(
    "recipe", REPORT_RECIPES + list(VARIANT_RECIPES) + NABEATS_RECIPES + PUBLIC_2026_RECIPES
)
def test_every_value_a_report_recipe_sets_says_where_it_comes_from(recipe, checkpoints):
    """A report recipe labels each value it sets "report", "assumption" or "toolkit" (a toolkit
    addition); what it does not set is shown as a default, so --dry-run shows the whole system."""
    unlabelled = []
    for step in pipeline.annotated_settings(recipe):
        sources = {name: source for name, _, source, _ in step["settings"]}
        assert set(sources.values()) <= {"report", "assumption", "toolkit", "recipe", "default"}
        unlabelled += [
            f"{step['notebook']}: {name}"
            for name, source in sources.items()
            if source == "recipe" and name.split(".")[0] not in pipeline.PLUMBING
        ]
        if "training.lr" in sources:  # every TrainConfig field is shown, defaults included
            shown = {name.split(".")[1] for name in sources if name.startswith("training.")}
            assert shown | {"name", "backbone", "checkpoint"} >= set(train.TrainConfig.fields())
    assert not unlabelled, unlabelled


def test_the_lora_recipes_label_the_full_fine_tuning_values_as_assumptions(checkpoints):
    """The EAT-ASP report gives lr, steps and batch for full fine-tuning only."""
    for recipe, mode_source in (("eat_asp_2", "report"), ("eat_asp_1", "report")):
        (eat,) = [s for s in pipeline.annotated_settings(recipe) if s["notebook"].startswith("03")]
        sources = {name: source for name, _, source, _ in eat["settings"]}
        lora = recipe == "eat_asp_2"
        for name in ("training.lr", "training.steps", "training.batch_size", "training.head_lr_scale"):
            assert sources[name] == ("assumption" if lora else "report"), (recipe, name)
        assert sources["training.mode"] == mode_source
        assert sources["training.grad_clip"] == sources["training.weight_decay"] == "assumption"
        assert ("training.lora_targets" in sources) and (sources["training.lora_targets"] != "recipe")


def test_dry_run_shows_every_setting_with_its_source(checkpoints, capsys):
    assert pipeline.main(["eat_asp_2", "--only", "03", "--dry-run", "--set", "03.training.seed=4"]) == 0
    out = capsys.readouterr().out
    assert "training.lr" in out and "[assumption] assumption: the report gives this for full" in out
    assert "training.mode" in out and "[report] report: LoRA" in out
    seed = next(line for line in out.splitlines() if "training.seed:" in line)
    assert "training.seed: 4" in seed and "[override]" in seed
    precision = next(line for line in out.splitlines() if "training.precision:" in line)
    assert precision.rstrip().endswith("[default]")
