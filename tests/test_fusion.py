"""Normalisation, fusion and the weight search on constructed branches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kit import fusion


def branch(
    separation: float, scale: float = 1.0, offset: float = 0.0, seed: int = 0, machines=("fan", "valve")
):
    """Scores of every clip of two sections: anomalies shifted up by ``separation`` standard deviations."""
    rng = np.random.default_rng(seed)
    rows = []
    for machine in machines:
        for i in range(30):
            domain = "target" if i < 3 else "source"
            rows.append((machine, "train", f"section_00_{domain}_train_normal_{i:04d}.wav", domain, "normal"))
        for domain in ("source", "target"):
            for label in ("normal", "anomaly"):
                for i in range(20):
                    rows.append(
                        (machine, "test", f"section_00_{domain}_test_{label}_{i:04d}.wav", domain, label)
                    )
    table = pd.DataFrame(rows, columns=["machine", "split", "file_name", "domain", "label"])
    table = table.assign(dataset="dev", section="00", channel="near")
    score = rng.normal(size=len(table)) + separation * (table["label"] == "anomaly").to_numpy()
    return table.assign(score=offset + scale * score)[fusion.SCORE_COLUMNS]


def test_normalise_by_train_gives_unit_reference_statistics():
    scores = branch(2.0, scale=7.0, offset=-3.0)
    normalised = fusion.normalise(scores, by="train")
    reference = normalised[normalised["split"] == "train"]
    for _, group in reference.groupby("machine"):
        assert group["score"].mean() == pytest.approx(0.0, abs=1e-12)
        assert group["score"].std(ddof=0) == pytest.approx(1.0)
    # A monotone map per group: the ranking inside a group is unchanged.
    fan = scores["machine"] == "fan"
    assert (
        np.argsort(normalised.loc[fan, "score"].to_numpy()) == np.argsort(scores.loc[fan, "score"].to_numpy())
    ).all()


def test_normalise_by_test_uses_the_test_clips():
    normalised = fusion.normalise(branch(2.0, scale=5.0), by="test")
    for _, group in normalised[normalised["split"] == "test"].groupby("machine"):
        assert group["score"].mean() == pytest.approx(0.0, abs=1e-12)
        assert group["score"].std(ddof=0) == pytest.approx(1.0)


def test_normalise_rejects_missing_references_and_constant_scores():
    scores = branch(1.0)
    with pytest.raises(ValueError, match="include_train=True"):
        fusion.normalise(scores[scores["split"] == "test"], by="train")
    with pytest.raises(ValueError, match="constant"):
        fusion.normalise(scores.assign(score=1.0), by="train")
    with pytest.raises(ValueError, match="normalise by"):
        fusion.normalise(scores, by="median")
    with pytest.raises(ValueError, match="not a finite number"):
        fusion.normalise(scores.assign(score=np.nan), by="train")


def test_weight_one_on_a_branch_returns_that_branch_normalised():
    a, b = branch(2.0, scale=3.0, seed=1), branch(0.0, seed=2)
    shuffled_b = b.sample(frac=1.0, random_state=0)  # rows in another order: fusion aligns by clip key
    fused = fusion.fuse({"a": a, "b": shuffled_b}, {"a": 1.0, "b": 0.0})
    expected = fusion.normalise(a)
    pd.testing.assert_frame_equal(fused.reset_index(drop=True), expected.reset_index(drop=True))


def test_label_free_mean_and_max_rules():
    a, b = branch(2.0, seed=3), branch(1.0, scale=10.0, seed=4)
    za, zb = fusion.normalise(a)["score"].to_numpy(), fusion.normalise(b)["score"].to_numpy()
    np.testing.assert_allclose(fusion.fuse({"a": a, "b": b}, "mean")["score"], (za + zb) / 2)
    np.testing.assert_allclose(fusion.fuse({"a": a, "b": b}, "max")["score"], np.maximum(za, zb))
    by_test = fusion.fuse({"a": a, "b": b}, "mean", normalise_by="test")
    zt = (fusion.normalise(a, by="test")["score"] + fusion.normalise(b, by="test")["score"]) / 2
    np.testing.assert_allclose(by_test["score"], zt)
    with pytest.raises(ValueError, match="mean"):
        fusion.fuse({"a": a, "b": b}, "median")


def test_fusion_keeps_a_shared_channel_and_marks_mixed_ones():
    a, b = branch(1.0, seed=5), branch(1.0, seed=6)
    assert (fusion.fuse({"a": a, "b": b})["channel"] == "near").all()
    assert (fusion.fuse({"a": a, "b": b.assign(channel="mean")})["channel"] == "fused").all()


def test_misaligned_branches_and_bad_weights_raise():
    a, b = branch(1.0, seed=7), branch(1.0, seed=8)
    with pytest.raises(ValueError, match="do not cover the same clips: 1 clips"):
        fusion.fuse({"a": a, "b": b.iloc[1:]}, "mean")
    with pytest.raises(ValueError, match="do not cover the same clips"):
        fusion.fuse({"a": a, "b": b.assign(file_name=b["file_name"].str.replace(".wav", ".flac"))}, "mean")
    with pytest.raises(ValueError, match="missing"):
        fusion.fuse({"a": a, "b": b}, {"a": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        fusion.fuse({"a": a, "b": b}, {"a": 1.0, "b": -0.5})
    with pytest.raises(ValueError, match="all zero"):
        fusion.fuse({"a": a, "b": b}, {"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="more than once"):
        fusion.fuse({"a": pd.concat([a, a.iloc[:1]]), "b": b})
    with pytest.raises(ValueError, match="non-empty"):
        fusion.fuse({})


def test_search_puts_weight_on_the_informative_branch():
    branches = {
        "informative": branch(1.5, scale=4.0, seed=9),
        "random": branch(0.0, seed=10),
        "weak": branch(0.3, scale=0.2, seed=11),
    }
    weights, best, history = fusion.search_weights(branches, n_iter=8, init_points=3, seed=0, progress=False)
    assert set(weights) == set(branches) and sum(weights.values()) == pytest.approx(1.0)
    assert weights["informative"] > 0.6
    singles = {
        name: fusion.official_objective(fusion.normalise(s).query("split == 'test'"))
        for name, s in branches.items()
    }
    assert best >= max(singles.values())
    assert best == pytest.approx(history["objective"].max())
    assert len(history) == 3 + 1 + 3 + 8
    assert list(history["phase"].unique()) == ["single", "mean", "random", "bayes"]
    # Same seed, same search.
    again = fusion.search_weights(branches, n_iter=8, init_points=3, seed=0, progress=False)
    assert again[0] == weights


def test_the_searchs_official_score_equals_kit_metrics():
    scores = fusion.normalise(branch(0.8, seed=16)).query("split == 'test'").reset_index(drop=True)
    fast = fusion._official_score_of_vectors(scores.drop(columns="score"))
    assert fast(scores["score"].to_numpy()) == pytest.approx(fusion.official_objective(scores), abs=1e-12)


def test_search_with_a_custom_objective():
    branches = {"a": branch(1.0, seed=12), "b": branch(1.0, seed=13)}

    def mean_anomaly_score(scores: pd.DataFrame) -> float:
        return float(scores.loc[scores["label"] == "anomaly", "score"].mean())

    weights, best, _ = fusion.search_weights(
        branches, n_iter=3, init_points=2, objective=mean_anomaly_score, progress=False
    )
    assert best == pytest.approx(mean_anomaly_score(fusion.fuse(branches, weights).query("split == 'test'")))


def test_search_needs_labelled_development_test_clips():
    a, b = branch(1.0, seed=14), branch(1.0, seed=15)
    hidden = {
        "a": a.assign(label=np.where(a["split"] == "test", "unknown", "normal")),
        "b": b.assign(label=np.where(b["split"] == "test", "unknown", "normal")),
    }
    with pytest.raises(ValueError, match="labels"):
        fusion.search_weights(hidden, n_iter=1, init_points=0, progress=False)
    evaluation = {"a": a.assign(dataset="eval"), "b": b.assign(dataset="eval")}
    with pytest.raises(ValueError, match="development test clips"):
        fusion.search_weights(evaluation, n_iter=1, init_points=0, progress=False)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_weights_round_trip(tmp_path, suffix):
    weights = {"beats_knn": 0.625, "eat/near": 0.375}
    path = fusion.save_weights(weights, tmp_path / "runs" / f"weights{suffix}")
    assert fusion.load_weights(path) == weights
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_weight_files_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match=".json, .yaml or .yml"):
        fusion.save_weights({"a": 1.0}, tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        fusion.load_weights(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid json"):
        fusion.load_weights(tmp_path / "broken.json")
    (tmp_path / "negative.yaml").write_text("a: -1\n")
    with pytest.raises(ValueError, match="non-negative"):
        fusion.load_weights(tmp_path / "negative.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        fusion.load_weights(tmp_path / "list.yaml")


def test_held_out_fusion_scores_each_clip_with_weights_not_fitted_on_it():
    branches = {"informative": branch(1.5, seed=9), "random": branch(0.0, seed=10)}
    fused, weights = fusion.held_out_fusion(branches, n_iter=2, init_points=2, progress=False)
    assert len(weights) == 2  # two machine types: leave one out
    assert all(w["informative"] > w["random"] for w in weights)
    fitted, _, _ = fusion.search_weights(branches, n_iter=2, init_points=2, progress=False)
    assert len(fused) == len(fusion.fuse(branches, fitted))
    # the clips of "fan" are fused with the weights searched on "valve" alone
    valve_only = {n: f[(f["machine"] == "valve") | (f["split"] == "train")] for n, f in branches.items()}
    expected = fusion.fuse(
        branches, fusion.search_weights(valve_only, n_iter=2, init_points=2, progress=False)[0]
    )
    fan = (fused["machine"] == "fan").to_numpy()
    np.testing.assert_allclose(fused.loc[fan, "score"], expected.loc[fan, "score"])
    one = {n: f[f["machine"] == "fan"] for n, f in branches.items()}
    halves, half_weights = fusion.held_out_fusion(one, n_iter=1, init_points=1, progress=False)
    assert len(half_weights) == 2 and np.isfinite(halves["score"]).all()
    with pytest.raises(ValueError, match="two or more development machine types"):
        fusion.held_out_fusion(one, folds="machine", progress=False)


def test_the_agreement_rule_finds_the_informative_branches_without_labels():
    """Three branches that separate anomalies (independent noise) and two that rank at random: the
    agreement weights go to the three, and the fusion beats the plain mean the random two drag down."""
    branches = {f"good{i}": branch(1.2, seed=i) for i in range(3)}
    branches |= {f"noise{i}": branch(0.0, scale=3.0, seed=10 + i) for i in range(2)}
    clips, matrix, names = fusion._aligned(branches, "train")
    table = fusion.agreement_weights(clips.drop(columns="label"), matrix)  # no label is read
    assert len(table) == 2  # one row per (dataset, machine, section)
    weights = table[[f"w{i}" for i in range(5)]].to_numpy()
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert weights[:, :3].sum(axis=1).min() > 0.85 and weights[:, :3].min() > 0.05
    agreement = fusion.official_objective(fusion.fuse(branches, "agreement").query("split == 'test'"))
    mean = fusion.official_objective(fusion.fuse(branches, "mean").query("split == 'test'"))
    assert agreement > mean + 0.03


def test_the_agreement_rule_is_the_mean_where_it_cannot_be_fitted():
    two = {"a": branch(1.0, seed=1), "b": branch(0.5, seed=2)}
    pd.testing.assert_frame_equal(fusion.fuse(two, "agreement"), fusion.fuse(two, "mean"))
    v = fusion._rank_one(np.outer([0.3, 0.2, 0.1], [0.3, 0.2, 0.1]) + np.diag([0.5, 0.5, 0.5]))
    assert np.allclose(v, [0.3, 0.2, 0.1], atol=1e-3)  # the diagonal does not enter the fit


def test_fuse_systems_adds_the_fusion_and_the_mean_beside_it():
    branches = {f"b{i}": branch(1.0, seed=i) for i in range(3)}
    systems, record = fusion.fuse_systems(branches, "agreement", progress=False)
    assert set(systems) == {"fusion", "fusion-mean"} and record["rule"] == "agreement"
    assert {row["machine"] for row in record["weights"]} == {"fan", "valve"}
    assert all(abs(sum(row[b] for b in branches) - 1) < 1e-9 for row in record["weights"])
    systems, record = fusion.fuse_systems(branches, "mean", progress=False)
    assert set(systems) == {"fusion"} and record["weights"] is None
    systems, record = fusion.fuse_systems(branches, "bayes", bayes_iter=1, bayes_init=1, progress=False)
    assert set(systems) == {"fusion", "fusion-mean", "fusion-heldout"} and set(record["weights"]) == set(
        branches
    )
    with pytest.raises(ValueError, match="unknown fusion rule 'median'"):
        fusion.fuse_systems(branches, "median")
