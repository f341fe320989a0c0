"""kit.tools.benchmark: seeds set everywhere, runs resumed, the table from the runs' results.csv."""

from __future__ import annotations

import pandas as pd
import pytest

from kit import pipeline
from kit.tools import benchmark


def test_every_seeded_step_of_a_recipe_gets_the_seed():
    assert benchmark.seed_overrides("benchmark", 2) == [
        "02.training.seed=2",
        "03.training.seed=2",
        "04.training.seed=2",
        "07.training.seed=2",
        "09.baseline_seed=2",
        "10.seed=2",
    ]
    assert benchmark.seed_overrides("audiocc_1", 1) == [
        "02.training.seed=1",
        "09.baseline_seed=1",
        "10.seed=1",
    ]
    spec = pipeline.apply_overrides(pipeline.load_recipe("default"), benchmark.seed_overrides("default", 5))
    for step in spec["steps"]:
        setting = benchmark.SEED_SETTINGS.get(step["notebook"][:2])
        if setting == "training.seed":
            assert step["params"]["training"]["seed"] == 5
        elif setting:
            assert step["params"][setting] == 5


def _fake_results(run_dir, scores: dict[str, float]) -> None:
    rows = [
        {
            "system": s,
            "machine": "overall",
            "hmean": v,
            "auc_source": v + 0.1,
            "auc_target": v - 0.1,
            "pauc": v,
        }
        for s, v in scores.items()
    ]
    rows.append({"system": "a", "machine": "fan", "hmean": 0.0, "auc_source": 0, "auc_target": 0, "pauc": 0})
    run_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run_dir / "results.csv", index=False)


def test_seeds_run_once_and_the_table_has_mean_and_spread(tmp_path, monkeypatch):
    calls = []

    def run(recipe, data_root, run_dir, overrides, kernel=None):
        calls.append((run_dir.name, overrides))
        seed = int(run_dir.name.split("-")[1])
        _fake_results(run_dir, {"a": 0.5 + 0.1 * seed, "b": 0.6})

    monkeypatch.setattr(pipeline, "run_recipe", run)
    out = tmp_path / "bench"
    assert (
        benchmark.main(["/data", "--recipe", "audiocc_1", "--seeds", "0", "1", "2", "--out", str(out)]) == 0
    )
    assert [c[0] for c in calls] == ["seed-0", "seed-1", "seed-2"] and "02.training.seed=1" in calls[1][1]
    table = pd.read_csv(out / "benchmark.csv").set_index("system")
    assert table.loc["a", "hmean_mean"] == pytest.approx(0.6) and table.loc[
        "a", "hmean_std"
    ] == pytest.approx(0.1)
    assert (table.loc["a", "hmean_min"], table.loc["a", "hmean_max"]) == pytest.approx((0.5, 0.7))
    assert table.loc["b", "hmean_std"] == 0 and table.loc["a", "runs"] == 3
    assert "| a | 0.600 ± 0.100 | 0.500 - 0.700 |" in (out / "benchmark.md").read_text()
    calls.clear()
    assert (
        benchmark.main(["/data", "--recipe", "audiocc_1", "--seeds", "0", "1", "2", "3", "--out", str(out)])
        == 0
    )
    assert [c[0] for c in calls] == ["seed-3"]  # finished seeds are kept
    assert benchmark.main(["--tables", str(out)]) == 0
    assert benchmark.main(["--tables", str(tmp_path / "none")]) == 2
