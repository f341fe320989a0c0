"""Scoring backends on constructed embeddings whose right answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import LedoitWolf, ShrunkCovariance
from sklearn.metrics import roc_auc_score

from kit import scoring


def clip_table(
    machine="fan", n_source=30, n_target=4, n_normal=10, n_anomaly=10, dataset="dev"
) -> pd.DataFrame:
    """One row per clip of one section: training (source + target) then test (normal + anomaly)."""
    rows = []
    for i in range(n_source):
        rows.append(("train", f"section_00_source_train_normal_{i:04d}.wav", "source", "normal"))
    for i in range(n_target):
        rows.append(("train", f"section_00_target_train_normal_{i:04d}.wav", "target", "normal"))
    for i in range(n_normal):
        rows.append(("test", f"section_00_source_test_normal_{i:04d}.wav", "source", "normal"))
    for i in range(n_anomaly):
        rows.append(("test", f"section_00_source_test_anomaly_{i:04d}.wav", "source", "anomaly"))
    table = pd.DataFrame(rows, columns=["split", "file_name", "domain", "label"])
    return table.assign(dataset=dataset, machine=machine, section="00")


def with_channels(clips: pd.DataFrame, channels=("near",)) -> pd.DataFrame:
    """The embedding meta: the clip table once per channel, channel-major."""
    return pd.concat([clips.assign(channel=c) for c in channels], ignore_index=True)


def test_knn_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    test, ref = rng.normal(size=(12, 6)), rng.normal(size=(25, 6))
    for k in (1, 3):
        expected = []
        for x in test:
            cos = [x @ r / np.linalg.norm(x) / np.linalg.norm(r) for r in ref]
            expected.append(np.mean(sorted(1 - c for c in cos)[:k]))
        np.testing.assert_allclose(scoring.knn_distance(test, ref, k=k), expected, atol=1e-5)


def test_knn_cosine_distance_ignores_row_scale():
    rng = np.random.default_rng(1)
    test, ref = rng.normal(size=(8, 5)), rng.normal(size=(20, 5))
    scaled = scoring.knn_distance(
        test * rng.uniform(0.1, 10, (8, 1)), ref * rng.uniform(0.1, 10, (20, 1)), k=2
    )
    np.testing.assert_allclose(scaled, scoring.knn_distance(test, ref, k=2), atol=1e-6)


def test_knn_rejects_bad_input():
    ref = np.ones((3, 4))
    with pytest.raises(ValueError, match="exceeds"):
        scoring.knn_distance(np.ones((2, 4)), ref, k=4)
    with pytest.raises(ValueError, match="NaN"):
        scoring.knn_distance(np.array([[np.nan, 1, 1, 1]]), ref)
    with pytest.raises(ValueError, match="dims"):
        scoring.knn_distance(np.ones((2, 5)), ref)
    with pytest.raises(ValueError, match="all zeros"):
        scoring.knn_distance(np.zeros((1, 4)), ref)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", 0.3])
def test_mahalanobis_matches_scipy_with_the_same_covariance(shrinkage):
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    test = rng.normal(size=(7, 6)) * 2
    model = LedoitWolf() if shrinkage == "ledoit_wolf" else ShrunkCovariance(shrinkage=shrinkage)
    model.fit(ref)
    precision = np.linalg.inv(model.covariance_)
    expected = [scipy_mahalanobis(x, model.location_, precision) for x in test]
    np.testing.assert_allclose(
        scoring.mahalanobis_distance(test, ref, shrinkage=shrinkage), expected, rtol=1e-8
    )


def test_mahalanobis_rejects_singular_covariance_and_bad_shrinkage():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(4, 10))  # fewer clips than dimensions
    with pytest.raises(ValueError, match="singular"):
        scoring.mahalanobis_distance(ref, ref, shrinkage=0.0)
    with pytest.raises(ValueError, match="shrinkage"):
        scoring.mahalanobis_distance(ref, ref, shrinkage="oas")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scoring.mahalanobis_distance(ref, ref, shrinkage=1.5)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", 0.2])
def test_mahalanobis_leave_one_out_equals_refit_without_the_clip(shrinkage):
    rng = np.random.default_rng(4)
    n, dims = 15, 5
    train = rng.normal(size=(n, dims))
    loo = scoring.score_group(
        train, train, ["source"] * n, backend="mahalanobis", shrinkage=shrinkage, loo_index=np.arange(n)
    )
    # Refit by hand without clip j: the full set's intensity, its target (mean variance) rescaled by n / (n - 1).
    delta = LedoitWolf().fit(train).shrinkage_ if shrinkage == "ledoit_wolf" else shrinkage
    tau = np.trace(np.cov(train.T, bias=True)) / dims * n / (n - 1)
    for j in range(n):
        rest = np.delete(train, j, axis=0)
        cov = (1 - delta) * np.cov(rest.T, bias=True) + delta * tau * np.eye(dims)
        expected = scipy_mahalanobis(train[j], rest.mean(axis=0), np.linalg.inv(cov))
        assert loo[j] == pytest.approx(expected, rel=1e-8)
    in_sample = scoring.mahalanobis_distance(train, train, shrinkage=shrinkage)
    assert (loo > in_sample).all()


def test_knn_leave_one_out_training_scores_exclude_the_clip_itself():
    rng = np.random.default_rng(5)
    clips = clip_table(n_source=12, n_target=3, n_normal=2, n_anomaly=2)
    emb = rng.normal(size=(len(clips), 8))
    scores = scoring.score_embeddings(with_channels(clips), emb, backend="knn", progress=False)
    train = emb[:15]
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    distance = 1 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)
    np.testing.assert_allclose(scores["score"].to_numpy()[:15], distance.min(axis=1), atol=1e-5)
    assert (scores["score"].to_numpy()[:15] > 1e-3).all()
    without_train = scoring.score_embeddings(with_channels(clips), emb, include_train=False, progress=False)
    assert (without_train["split"] == "test").all() and len(without_train) == 4
    np.testing.assert_allclose(without_train["score"], scores["score"].to_numpy()[15:])


def test_separate_domain_references_keep_target_normals_inlying():
    """A target cluster far from the source: pooled, its normals look anomalous; separate, they do not."""
    rng = np.random.default_rng(6)
    source = rng.normal(size=(200, 4))
    target = rng.normal(size=(10, 4)) + [12, 0, 0, 0]
    train = np.concatenate([source, target])
    domain = ["source"] * 200 + ["target"] * 10
    target_normals = rng.normal(size=(20, 4)) + [12, 0, 0, 0]
    pooled = scoring.score_group(target_normals, train, domain, backend="mahalanobis")
    separate = scoring.score_group(
        target_normals, train, domain, backend="mahalanobis", separate_domains=True
    )
    source_normals = scoring.score_group(
        rng.normal(size=(20, 4)), train, domain, backend="mahalanobis", separate_domains=True
    )
    assert separate.mean() < 0.5 * pooled.mean()
    assert separate.mean() < 2 * source_normals.mean()
    # The separate score is the smaller of the two per-domain distances.
    expected = np.minimum(
        scoring.mahalanobis_distance(target_normals, source),
        scoring.mahalanobis_distance(target_normals, target),
    )
    np.testing.assert_allclose(separate, expected)


def test_separate_domains_needs_both_domains():
    train = np.random.default_rng(7).normal(size=(6, 3))
    with pytest.raises(ValueError, match="no target"):
        scoring.score_group(train, train, ["source"] * 6, separate_domains=True)


def test_smote_points_lie_on_segments_between_distinct_target_points():
    points = np.random.default_rng(8).normal(size=(10, 5))
    synthetic, parents = scoring.smote_oversample(points, 50, seed=3)
    assert synthetic.shape == (50, 5) and (parents[:, 0] != parents[:, 1]).all()
    start, end = points[parents[:, 0]], points[parents[:, 1]]
    position = np.einsum("ij,ij->i", synthetic - start, end - start) / np.einsum(
        "ij,ij->i", end - start, end - start
    )
    assert ((position >= 0) & (position <= 1)).all()
    np.testing.assert_allclose(start + position[:, None] * (end - start), synthetic, atol=1e-10)
    again, _ = scoring.smote_oversample(points, 50, seed=3)
    np.testing.assert_array_equal(again, synthetic)
    assert not np.allclose(scoring.smote_oversample(points, 50, seed=4)[0], synthetic)


def test_smote_adds_references_and_leave_one_out_drops_a_clips_offspring():
    rng = np.random.default_rng(9)
    train = rng.normal(size=(12, 6))
    domain = ["source"] * 10 + ["target"] * 2
    test = rng.normal(size=(30, 6))
    plain = scoring.score_group(test, train, domain, separate_domains=True)
    oversampled = scoring.score_group(test, train, domain, separate_domains=True, smote=20)
    assert (oversampled <= plain + 1e-9).all() and (oversampled < plain - 1e-6).any()
    # With two target clips every SMOTE point descends from both: left out, target clip 10's only
    # target reference is clip 11.
    loo = scoring.score_group(
        train[10:11], train, domain, separate_domains=True, smote=20, loo_index=np.array([10])
    )
    expected = min(
        scoring.knn_distance(train[10:11], train[:10])[0], scoring.knn_distance(train[10:11], train[11:12])[0]
    )
    assert loo[0] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="knn backend only"):
        scoring.score_group(test, train, domain, backend="mahalanobis", smote=5)


def test_channels_are_never_mixed():
    rng = np.random.default_rng(10)
    clips = clip_table(n_source=20, n_target=0, n_normal=5, n_anomaly=5)
    near = rng.normal(size=(len(clips), 8))
    # Far embeddings identical to the near test clips: mixed in as references they would zero the near scores.
    far = near.copy()
    far[:20] = near[20:][rng.integers(0, 10, 20)]
    meta = with_channels(clips, ("near", "far"))
    emb = np.concatenate([near, far])
    near_scores = scoring.score_embeddings(meta, emb, channel_policy="near", progress=False)
    expected = scoring.knn_distance(near[20:], near[:20])
    np.testing.assert_allclose(near_scores["score"].to_numpy()[20:], expected, atol=1e-5)
    assert (near_scores["channel"] == "near").all()
    far_scores = scoring.score_embeddings(meta, emb, channel_policy="far", progress=False)
    np.testing.assert_allclose(
        far_scores["score"].to_numpy()[20:], scoring.knn_distance(far[20:], far[:20]), atol=1e-5
    )


def test_groups_are_scored_apart():
    rng = np.random.default_rng(11)
    fan, valve = clip_table("fan", 10, 0, 3, 3), clip_table("valve", 10, 0, 3, 3)
    emb_fan, emb_valve = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))
    both = scoring.score_embeddings(
        with_channels(pd.concat([fan, valve], ignore_index=True)),
        np.concatenate([emb_fan, emb_valve]),
        progress=False,
    )
    alone = scoring.score_embeddings(with_channels(valve), emb_valve, progress=False)
    np.testing.assert_allclose(both[both["machine"] == "valve"]["score"], alone["score"])
    assert list(both.columns) == scoring.SCORE_COLUMNS


def residual_world(seed=12):
    """near = m + n, far = 0.3 m + n: a large shared noise n hides the machine part m (where anomalies live)."""
    rng = np.random.default_rng(seed)
    clips = clip_table(n_source=60, n_target=0, n_normal=30, n_anomaly=30)
    dims = 16
    machine = np.tile(np.eye(dims)[0] * 3, (len(clips), 1)) + 0.1 * rng.normal(size=(len(clips), dims))
    machine[clips["label"].to_numpy() == "anomaly"] += np.eye(dims)[1] * 1.5
    noise = 6 * rng.normal(size=(len(clips), dims))
    meta = with_channels(clips, ("near", "far"))
    return meta, np.concatenate([machine + noise, 0.3 * machine + noise])


def test_residual_policy_removes_a_shared_noise_component():
    meta, emb = residual_world()
    results = {}
    for policy in ("near", "residual"):
        scores = scoring.score_embeddings(
            meta, emb, channel_policy=policy, include_train=False, progress=False
        )
        results[policy] = roc_auc_score(scores["label"] == "anomaly", scores["score"])
        assert (scores["channel"] == policy).all() and len(scores) == 60
    assert results["residual"] > 0.95
    assert results["near"] < 0.8


def test_zmean_policy_averages_train_standardised_channels():
    meta, emb = residual_world(seed=13)
    near = scoring.score_embeddings(meta, emb, channel_policy="near", progress=False)["score"].to_numpy()
    far = scoring.score_embeddings(meta, emb, channel_policy="far", progress=False)["score"].to_numpy()
    zmean = scoring.score_embeddings(meta, emb, channel_policy="zmean", progress=False)
    train = (zmean["split"] == "train").to_numpy()

    def z(x):
        return (x - x[train].mean()) / x[train].std()

    np.testing.assert_allclose(zmean["score"], (z(near) + z(far)) / 2, atol=1e-9)
    assert (zmean["channel"] == "zmean").all()


def test_mean_policy_averages_the_raw_channel_scores_as_the_eat_asp_report():
    meta, emb = residual_world(seed=13)
    near = scoring.score_embeddings(meta, emb, channel_policy="near", progress=False)
    far = scoring.score_embeddings(meta, emb, channel_policy="far", progress=False)
    mean = scoring.score_embeddings(meta, emb, channel_policy="mean", progress=False)
    np.testing.assert_allclose(mean["score"], (near["score"] + far["score"]) / 2, atol=1e-12)
    assert (mean["channel"] == "mean").all()
    assert mean[scoring.CLIP_KEY].equals(near[scoring.CLIP_KEY])
    test_only = scoring.score_embeddings(
        meta, emb, channel_policy="mean", include_train=False, progress=False
    )
    np.testing.assert_allclose(test_only["score"], mean.loc[mean["split"] != "train", "score"], atol=1e-12)


def test_score_embeddings_rejects_bad_input():
    clips = clip_table(n_source=5, n_target=0, n_normal=2, n_anomaly=2)
    meta, emb = with_channels(clips), np.random.default_rng(14).normal(size=(9, 4))
    with pytest.raises(ValueError, match="channel_policy"):
        scoring.score_embeddings(meta, emb, channel_policy="both", progress=False)
    with pytest.raises(ValueError, match="backend"):
        scoring.score_embeddings(meta, emb, backend="lof", progress=False)
    with pytest.raises(ValueError, match="no far embedding"):
        scoring.score_embeddings(meta, emb, channel_policy="residual", progress=False)
    with pytest.raises(ValueError, match="9 rows but the embedding matrix has 8"):
        scoring.score_embeddings(meta, emb[:8], progress=False)
    with pytest.raises(ValueError, match="more than once"):
        scoring.score_embeddings(pd.concat([meta, meta[:1]]), np.concatenate([emb, emb[:1]]), progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        scoring.score_embeddings(meta, emb, k=5, progress=False)
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="row 3"):
        scoring.score_embeddings(meta, bad, progress=False)


def test_score_branches_names_every_combination_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    clips = clip_table(n_source=12, n_target=3, n_normal=4, n_anomaly=4)
    both = with_channels(clips, ("near", "far"))
    near_only = with_channels(clips, ("near",))
    embeddings = {
        "a": (both, rng.normal(size=(len(both), 8)).astype(np.float32)),
        "b": (near_only, rng.normal(size=(len(near_only), 8)).astype(np.float32)),
    }
    systems = scoring.score_branches(
        embeddings, ("knn", "mahalanobis"), ("near", "mean"), separate_domains=False
    )
    assert sorted(systems) == [
        "a-knn-mean",
        "a-knn-near",
        "a-mahalanobis-mean",
        "a-mahalanobis-near",
        "b-knn-near",
        "b-mahalanobis-near",
    ]  # far-based policies need far embeddings
    scoring.save_scores(systems, tmp_path / "scores")
    loaded = scoring.load_scores(tmp_path / "scores")
    assert sorted(loaded) == sorted(systems)
    pd.testing.assert_frame_equal(
        loaded["a-knn-near"], systems["a-knn-near"].reset_index(drop=True), check_dtype=False
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a score file"):
        scoring.load_scores(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="09_scoring"):
        scoring.load_scores(tmp_path / "empty")


def test_a_collapsed_branch_is_left_out_with_a_warning_naming_it():
    rng = np.random.default_rng(0)
    clips = clip_table(n_source=12, n_target=3, n_normal=4, n_anomaly=4)
    both = with_channels(clips, ("near", "far"))
    collapsed = rng.normal(size=(len(both), 8)).astype(np.float32)
    is_train_near = ((both["split"] == "train") & (both["channel"] == "near")).to_numpy()
    collapsed[is_train_near] = collapsed[is_train_near][0]  # every near training clip on one point
    with pytest.raises(scoring.DegenerateScoresError, match="training scores are constant"):
        scoring.score_embeddings(both, collapsed, backend="knn", channel_policy="zmean", progress=False)
    with pytest.warns(UserWarning, match="c-knn-zmean left out: group"):
        systems = scoring.score_branches(
            {"c": (both, collapsed)}, ("knn",), ("near", "zmean"), progress=False
        )
    assert sorted(systems) == ["c-knn-near"]
    assert list(scoring.select_systems(systems, ["c-knn-near"])) == ["c-knn-near"]
    with pytest.raises(KeyError, match=r"no scores for \['c-knn-zmean'\]; scored systems: \['c-knn-near'\]"):
        scoring.select_systems(systems, ["c-knn-near", "c-knn-zmean"])


# --------------------------------------------------------------------------------------------------
# Distance normalisation for the target domain
# --------------------------------------------------------------------------------------------------
def _cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1 - a @ b.T


def _loo_1nn(points):
    distance = _cosine(points, points)
    np.fill_diagonal(distance, np.inf)
    return distance.min(axis=1)


def _two_domains(seed=11, n_source=40, n_target=6, dims=5):
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(n_source, dims)) * 0.3 + [3, 0, 0, 0, 0]
    target = rng.normal(size=(n_target, dims)) * 0.6 + [0, 3, 0, 0, 0]
    return rng, np.concatenate([source, target]), ["source"] * n_source + ["target"] * n_target


@pytest.mark.parametrize("normalisation", ["domain_mean", "domain_zscore"])
def test_domain_normalisation_puts_each_domains_distances_on_its_leave_one_out_scale(normalisation):
    rng, train, domain = _two_domains()
    source, target = train[:40], train[40:]
    test = rng.normal(size=(25, 5))
    scores = scoring.score_group(test, train, domain, separate_domains=True, normalisation=normalisation)
    parts = []
    for refs in (source, target):
        distance, own = _cosine(test, refs).min(axis=1), _loo_1nn(refs)
        parts.append(
            distance / own.mean() if normalisation == "domain_mean" else (distance - own.mean()) / own.std()
        )
    np.testing.assert_allclose(scores, np.minimum(*parts), rtol=1e-5, atol=1e-6)
    # The default keeps today's raw smaller distance.
    raw = scoring.score_group(test, train, domain, separate_domains=True)
    np.testing.assert_allclose(
        raw, np.minimum(_cosine(test, source).min(1), _cosine(test, target).min(1)), atol=1e-6
    )


def test_domain_mean_normalisation_of_mahalanobis_uses_the_exact_leave_one_out_distances():
    rng, train, domain = _two_domains(seed=12)
    test = rng.normal(size=(10, 5))
    scores = scoring.score_group(
        test, train, domain, backend="mahalanobis", separate_domains=True, normalisation="domain_mean"
    )
    parts = []
    for rows in (np.arange(40), np.arange(40, 46)):
        refs = train[rows]
        own = scoring.score_group(
            refs, refs, ["source"] * len(refs), backend="mahalanobis", loo_index=np.arange(len(refs))
        )
        parts.append(scoring.mahalanobis_distance(test, refs) / own.mean())
    np.testing.assert_allclose(scores, np.minimum(*parts), rtol=1e-8)


def test_domain_normalisation_rescues_normals_of_a_sparse_target_domain():
    """Ten target clips spread wider than the source: raw distances make target normals look
    anomalous; on each domain's own scale they rank like source normals."""
    rng = np.random.default_rng(13)
    centre_s, centre_t = np.eye(8)[0] * 4, np.eye(8)[1] * 4
    train = np.concatenate(
        [centre_s + rng.normal(size=(100, 8)) * 0.2, centre_t + rng.normal(size=(10, 8)) * 0.8]
    )
    domain = ["source"] * 100 + ["target"] * 10
    normals = np.concatenate(
        [centre_s + rng.normal(size=(30, 8)) * 0.2, centre_t + rng.normal(size=(30, 8)) * 0.8]
    )
    anomalies = np.concatenate(
        [centre_s + rng.normal(size=(30, 8)) * 0.6, centre_t + rng.normal(size=(30, 8)) * 2.0]
    )
    test = np.concatenate([normals, anomalies])
    truth = np.r_[np.zeros(60), np.ones(60)]
    raw = scoring.score_group(test, train, domain, separate_domains=True)
    normalised = scoring.score_group(test, train, domain, separate_domains=True, normalisation="domain_mean")
    assert roc_auc_score(truth, normalised) > roc_auc_score(truth, raw) + 0.05


@pytest.mark.parametrize("density_k", [1, 3])
def test_local_density_divides_each_reference_distance_by_that_references_own_knn_distance(density_k):
    rng, train, domain = _two_domains(seed=14)
    test = rng.normal(size=(20, 5))
    scores = scoring.score_group(test, train, domain, k=2, normalisation="local_density", density_k=density_k)
    own = _cosine(train, train)
    np.fill_diagonal(own, np.inf)
    density = np.sort(own, axis=1)[:, :density_k].mean(axis=1)
    expected = np.sort(np.maximum(_cosine(test, train), 0) / density[None, :], axis=1)[:, :2].mean(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    # A training clip scored leave-one-out never meets itself (its own ratio would be 0).
    loo = scoring.score_group(
        train[:3], train, domain, normalisation="local_density", density_k=density_k, loo_index=np.arange(3)
    )
    assert (loo > 0.1).all()


def test_normalisation_options_pass_through_score_embeddings():
    rng = np.random.default_rng(15)
    clips = clip_table(n_source=20, n_target=4, n_normal=5, n_anomaly=5)
    emb = rng.normal(size=(len(clips), 6))
    meta = with_channels(clips)
    direct = scoring.score_group(
        emb[24:], emb[:24], clips["domain"][:24], separate_domains=True, normalisation="domain_zscore"
    )
    scores = scoring.score_embeddings(
        meta, emb, separate_domains=True, normalisation="domain_zscore", include_train=False, progress=False
    )
    np.testing.assert_allclose(scores["score"], direct)
    systems = scoring.score_branches(
        {"b": (meta, emb)}, backends=("knn",), normalisation="local_density", density_k=2, progress=False
    )
    alone = scoring.score_embeddings(meta, emb, normalisation="local_density", density_k=2, progress=False)
    pd.testing.assert_frame_equal(systems["b-knn-near"], alone)


def test_normalisation_rejects_what_it_cannot_do():
    rng, train, domain = _two_domains(seed=16)
    test = rng.normal(size=(4, 5))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        scoring.score_group(test, train, domain, normalisation="zscore")
    with pytest.raises(ValueError, match="needs separate_domains=True"):
        scoring.score_group(test, train, domain, normalisation="domain_mean")
    with pytest.raises(ValueError, match="needs backend='knn'"):
        scoring.score_group(test, train, domain, backend="mahalanobis", normalisation="local_density")
    with pytest.raises(ValueError, match="use one"):
        scoring.score_group(test, train, domain, normalisation="local_density", smote=10)
    with pytest.raises(ValueError, match="density_k must be a positive integer"):
        scoring.score_group(test, train, domain, normalisation="local_density", density_k=0)
    with pytest.raises(ValueError, match="density_k"):
        scoring.score_group(
            test, train, domain, separate_domains=True, normalisation="local_density", density_k=6
        )
    twins = np.repeat(train[:1], 4, axis=0) + 0.0
    with pytest.raises(scoring.DegenerateScoresError, match="identical neighbours"):
        scoring.score_group(test, twins, ["source"] * 4, normalisation="local_density")
    with pytest.raises(scoring.DegenerateScoresError, match="constant"):
        scoring.score_group(
            test,
            np.concatenate([twins, train[40:]]),
            ["source"] * 4 + ["target"] * 6,
            separate_domains=True,
            normalisation="domain_zscore",
        )


def _condition_world(seed=3):
    """Two attribute values, each a direction in embedding space. ``near`` hides them under a large
    noise, ``w1`` (a canceller's output) keeps them: auto must choose w1 from training clips alone."""
    rng = np.random.default_rng(seed)
    clips = clip_table(n_source=40, n_target=4, n_normal=10, n_anomaly=10)
    clips["attributes"] = np.where(np.arange(len(clips)) % 2 == 0, "spd_1", "spd_2")
    dims = 12
    condition = (
        np.where((clips["attributes"] == "spd_1").to_numpy()[:, None], np.eye(dims)[0], np.eye(dims)[1]) * 3
    )
    anomaly = (clips["label"] == "anomaly").to_numpy()[:, None] * np.eye(dims)[2] * 2
    clean = condition + anomaly + 0.2 * rng.normal(size=(len(clips), dims))
    meta = with_channels(clips, ("near", "far", "w1"))
    near = clean + 8 * rng.normal(size=clean.shape)
    far = 8 * rng.normal(size=clean.shape)
    return meta, np.concatenate([near, far, clean + 0.1 * rng.normal(size=clean.shape)])


def test_a_canceller_channel_is_a_policy_and_auto_chooses_it_from_training_clips():
    meta, emb = _condition_world()
    w1 = scoring.score_embeddings(meta, emb, channel_policy="w1", progress=False)
    assert (w1["channel"] == "w1").all()
    auto = scoring.score_embeddings(meta, emb, channel_policy="auto", progress=False)
    assert (auto["channel"] == "auto:w1").all()
    np.testing.assert_array_equal(auto["score"], w1["score"])
    # the choice uses training clips only: scrambling every test embedding leaves it unchanged
    scrambled = emb.copy()
    test = (meta["split"] == "test").to_numpy()
    scrambled[test] = np.random.default_rng(0).normal(size=(int(test.sum()), emb.shape[1]))
    assert (
        scoring.score_embeddings(meta, scrambled, channel_policy="auto", progress=False)["channel"]
        == "auto:w1"
    ).all()
    # without a better canceller the near channel stays
    swapped = np.concatenate(
        [emb[2 * len(meta) // 3 :], emb[len(meta) // 3 : 2 * len(meta) // 3], emb[: len(meta) // 3]]
    )
    assert (
        scoring.score_embeddings(meta, swapped, channel_policy="auto", progress=False)["channel"]
        == "auto:near"
    ).all()
    with pytest.raises(ValueError, match="channel_policy must be one of"):
        scoring.score_embeddings(meta, emb, channel_policy="w9", progress=False)


def test_score_branches_skips_what_a_branch_has_not_embedded_and_takes_per_backend_options():
    meta, emb = _condition_world()
    near_only = meta["channel"] == "near"
    systems = scoring.score_branches(
        {"a": (meta, emb), "b": (meta[near_only].reset_index(drop=True), emb[near_only.to_numpy()])},
        ("knn", "mahalanobis"),
        ("near", "w1", "auto", "mean"),
        smote={"knn": 4},
        progress=False,
    )
    assert sorted(systems) == [
        "a-knn-auto",
        "a-knn-mean",
        "a-knn-near",
        "a-knn-w1",
        "a-mahalanobis-auto",
        "a-mahalanobis-mean",
        "a-mahalanobis-near",
        "a-mahalanobis-w1",
        "b-knn-auto",
        "b-knn-near",
        "b-mahalanobis-auto",
        "b-mahalanobis-near",
    ]  # smote reached the knn backend only (mahalanobis refuses it); auto is near where nothing else is
    assert (systems["b-knn-auto"]["channel"] == "auto:near").all()
    with pytest.raises(ValueError, match="per-backend values must be keyed by"):
        scoring.score_branches({"a": (meta, emb)}, ("knn",), ("near",), smote={"lof": 1}, progress=False)


def test_domain_options_tool_scores_every_option_and_summarises_over_runs():
    from kit.tools import domain_options

    meta, emb = _condition_world()
    # half of the test clips in the target domain, so both AUCs are defined
    target = (meta["split"] == "test") & (meta["file_name"].str[-6:-4].astype(int) % 2 == 1)
    meta.loc[target, "domain"] = "target"
    meta.loc[target, "file_name"] = meta.loc[target, "file_name"].str.replace("_source_", "_target_")
    tables = [
        domain_options.score_options(meta, emb, "a", "w1"),
        domain_options.score_options(meta, emb, "a"),
    ]
    assert list(tables[0]["option"]) == list(domain_options.OPTIONS)
    # the w1 channel keeps the anomaly direction that noise hides on near
    assert tables[0]["hmean"].min() > tables[1]["hmean"].max()
    summary = domain_options.summarise(tables)
    assert (summary["runs"] == 2).all() and (summary["hmean_sd"] > 0).all()
    text = domain_options.to_markdown(summary)
    assert text.count("\n") == len(domain_options.OPTIONS) + 1 and "±" in text


def test_domain_options_tool_names_a_run_without_the_branch(tmp_path, capsys):
    from kit.tools import domain_options

    assert domain_options.main([str(tmp_path), "--branches", "cnn"]) == 2
    err = capsys.readouterr().err
    assert "branch 'cnn' is not recorded" in err and str(tmp_path) in err and not err.startswith('error: "')


# --------------------------------------------------------------------------------------------------
# Backends through one registry
# --------------------------------------------------------------------------------------------------
class _CentroidBackend(scoring.Backend):
    """A toy backend: cosine distance to the mean direction of the references (the clip itself left out)."""

    name = "centroid"
    options = {"power": 1}

    def fit(self, references, *, normalisation=None, power=1):
        self.unit = references / np.linalg.norm(references, axis=1, keepdims=True)
        self.power = power
        return self

    def distances(self, test, loo=None):
        total = np.broadcast_to(self.unit.sum(axis=0), test.shape).copy()
        if loo is not None:
            total[loo >= 0] -= self.unit[loo[loo >= 0]]
        cos = (
            np.einsum("ij,ij->i", test, total) / np.linalg.norm(test, axis=1) / np.linalg.norm(total, axis=1)
        )
        return (1 - cos) ** self.power


def test_a_registered_backend_is_scored_everywhere_with_its_own_options(monkeypatch):
    monkeypatch.setattr(scoring, "REGISTRY", dict(scoring.REGISTRY))
    assert scoring.BACKENDS == ("knn", "mahalanobis", "beam", "knn_white")
    scoring.register_backend(_CentroidBackend)
    with pytest.raises(ValueError, match="registered already"):
        scoring.register_backend(_CentroidBackend)
    rng = np.random.default_rng(20)
    clips = clip_table(n_source=10, n_target=3, n_normal=3, n_anomaly=3)
    meta, emb = with_channels(clips), rng.normal(size=(len(clips), 5))
    systems = scoring.score_branches(
        {"a": (meta, emb)}, ("knn", "centroid"), ("near",), power={"centroid": 2}, progress=False
    )
    assert sorted(systems) == ["a-centroid-near", "a-knn-near"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    # a test clip against the mean of the 13 training clips; a training clip against the other 12
    test_cos = (
        unit[13:] @ unit[:13].sum(0) / np.linalg.norm(unit[13:], axis=1) / np.linalg.norm(unit[:13].sum(0))
    )
    np.testing.assert_allclose(systems["a-centroid-near"]["score"].to_numpy()[13:], (1 - test_cos) ** 2)
    others = unit[:13].sum(0) - unit[0]
    assert systems["a-centroid-near"]["score"].iloc[0] == pytest.approx(
        (1 - unit[0] @ others / np.linalg.norm(others)) ** 2
    )
    # the knn backend ignores the centroid's setting; what the backend does not declare, it refuses
    np.testing.assert_allclose(
        systems["a-knn-near"]["score"], scoring.score_embeddings(meta, emb, progress=False)["score"]
    )
    with pytest.raises(ValueError, match="smote oversampling applies to the knn backend only"):
        scoring.score_embeddings(meta, emb, backend="centroid", smote=3, progress=False)
    with pytest.raises(ValueError, match="needs backend='knn'"):
        scoring.score_embeddings(meta, emb, backend="centroid", normalisation="local_density", progress=False)
    with pytest.raises(ValueError, match=r"unknown scoring option\(s\) \['powr'\]"):
        scoring.score_embeddings(meta, emb, backend="centroid", powr=2, progress=False)
    with pytest.raises(ValueError, match="per-backend values must be keyed by"):
        scoring.score_branches({"a": (meta, emb)}, ("centroid",), ("near",), power={"lof": 1}, progress=False)


def test_per_band_embeddings_are_flattened_for_knn_and_mahalanobis():
    rng = np.random.default_rng(21)
    clips = clip_table(n_source=30, n_target=0, n_normal=4, n_anomaly=4)
    per_band = rng.normal(size=(len(clips), 3, 4))
    flat = per_band.reshape(len(clips), 12)
    for backend in ("knn", "mahalanobis"):
        banded = scoring.score_embeddings(with_channels(clips), per_band, backend=backend, progress=False)
        plain = scoring.score_embeddings(with_channels(clips), flat, backend=backend, progress=False)
        np.testing.assert_allclose(banded["score"], plain["score"])
    with pytest.raises(ValueError, match="3 bands x 4 dims but references have 3 bands x 5 dims"):
        scoring.score_group(per_band[:2], rng.normal(size=(5, 3, 5)), ["source"] * 5)


# --------------------------------------------------------------------------------------------------
# BEAM + VarMin
# --------------------------------------------------------------------------------------------------
def _unit_bands(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_beam(test, refs, alpha, spread, loo=None):
    """beam.md by loops: per clip and band the smallest D - alpha b over the references, mean over bands."""
    test, refs = _unit_bands(test), _unit_bands(refs)
    out = []
    for m, q in enumerate(test):
        bands = []
        for f in range(refs.shape[1]):
            values = [
                0.5 * (1 - q[f] @ refs[i, f]) - alpha[f] * spread[i, f]
                for i in range(len(refs))
                if loo is None or loo[m] != i
            ]
            bands.append(min(values))
        out.append(np.mean(bands))
    return np.array(out)


def _brute_varmin(refs, n=4):
    """b[i, f] (mean distance to the n nearest others) and alpha[f] = Cov(u, v) / Var(v), by loops."""
    refs = _unit_bands(refs)
    count, bands = refs.shape[:2]
    spread, alpha = np.zeros((count, bands)), np.zeros(bands)
    for f in range(bands):
        d = 0.5 * (1 - refs[:, f] @ refs[:, f].T)
        np.fill_diagonal(d, np.inf)
        spread[:, f] = [np.mean(sorted(row)[:n]) for row in d]
        nearest = d.argmin(axis=1)
        u, v = d[np.arange(count), nearest], spread[nearest, f]
        alpha[f] = np.mean((u - u.mean()) * (v - v.mean())) / np.var(v)
    return alpha, spread


def test_beam_chooses_the_nearest_reference_of_each_band_apart():
    """Low band like reference A, high band like reference B: BEAM finds both (score 0), while the
    nearest reference of the flattened clip is C, close to neither band."""
    e0, e1 = np.eye(2)
    c = _unit_bands(e0 + 0.5 * e1)
    refs = np.array([[e0, e1], [e1, e0], [c, c]])  # A, B, C: [3 clips, 2 bands, 2 dims]
    query = np.array([[e0, e0]])
    flat = _unit_bands(refs.reshape(3, 4)) @ _unit_bands(query.reshape(1, 4))[0]
    assert flat.argmax() == 2  # the flattened nearest is C
    assert scoring.beam_distance(query, refs, varmin=False)[0] == pytest.approx(0.0, abs=1e-6)
    # through C alone each band lies 0.5 (1 - cos) away
    assert scoring.beam_distance(query, refs[2:], varmin=False)[0] == pytest.approx(
        0.5 * (1 - c @ e0), rel=1e-5
    )
    assert scoring.score_group(query, refs, ["source"] * 3, backend="beam", varmin=False)[0] == pytest.approx(
        0.0, abs=1e-6
    )
    assert scoring.knn_distance(query.reshape(1, 4), refs.reshape(3, 4))[0] > 0.05


def test_beam_with_varmin_follows_beam_md_formulas():
    rng = np.random.default_rng(22)
    refs = rng.normal(size=(14, 3, 6)) + np.array([1.0, 0, 0, 0, 0, 0])
    refs[:4] += rng.normal(size=(4, 3, 6)) * 2  # a sparse part of the memory: VarMin has work to do
    test = rng.normal(size=(9, 3, 6))
    alpha, spread = _brute_varmin(refs)
    fitted = scoring.REGISTRY["beam"]().fit(refs)
    np.testing.assert_allclose(fitted.spread, spread, rtol=1e-5)
    np.testing.assert_allclose(fitted.alpha, alpha, rtol=1e-4, atol=1e-6)
    assert np.abs(alpha).min() > 1e-3
    np.testing.assert_allclose(
        scoring.beam_distance(test, refs), _brute_beam(test, refs, alpha, spread), atol=1e-5
    )
    # training clips, leave-one-out: the memory (and alpha) keep every clip, the clip's own entry is skipped
    loo = scoring.score_group(refs, refs, ["source"] * 14, backend="beam", loo_index=np.arange(14))
    np.testing.assert_allclose(loo, _brute_beam(refs, refs, alpha, spread, loo=np.arange(14)), atol=1e-5)
    # two neighbours instead of four
    alpha2, spread2 = _brute_varmin(refs, n=2)
    np.testing.assert_allclose(
        scoring.beam_distance(test, refs, beam_neighbours=2),
        _brute_beam(test, refs, alpha2, spread2),
        atol=1e-5,
    )


def test_varmin_with_alpha_zero_is_plain_beam():
    rng = np.random.default_rng(23)
    refs, test = rng.normal(size=(20, 4, 8)), rng.normal(size=(7, 4, 8))
    fitted = scoring.REGISTRY["beam"]().fit(refs)
    assert np.abs(fitted.alpha).max() > 1e-3
    corrected = fitted.distances(test)
    fitted.alpha[:] = 0.0
    plain = scoring.beam_distance(test, refs, varmin=False)
    np.testing.assert_allclose(fitted.distances(test), plain, atol=1e-7)
    np.testing.assert_allclose(plain, _brute_beam(test, refs, np.zeros(4), np.zeros((20, 4))), atol=1e-6)
    assert not np.allclose(corrected, plain, atol=1e-4)


def test_beam_leave_one_out_never_picks_the_clip_itself():
    rng = np.random.default_rng(24)
    clips = clip_table(n_source=16, n_target=4, n_normal=3, n_anomaly=3)
    emb = rng.normal(size=(len(clips), 2, 5)).astype(np.float32)
    emb[20:23] = emb[:3]  # test clips equal to training clips: those are their nearest at distance 0
    for varmin in (False, True):
        scores = scoring.score_embeddings(
            with_channels(clips), emb, backend="beam", varmin=varmin, progress=False
        )
        alpha, spread = _brute_varmin(emb[:20]) if varmin else (np.zeros(2), np.zeros((20, 2)))
        expected_train = _brute_beam(emb[:20], emb[:20], alpha, spread, loo=np.arange(20))
        np.testing.assert_allclose(scores["score"].to_numpy()[:20], expected_train, atol=1e-5)
        np.testing.assert_allclose(
            scores["score"].to_numpy()[20:], _brute_beam(emb[20:], emb[:20], alpha, spread), atol=1e-5
        )
    plain = scoring.score_embeddings(with_channels(clips), emb, backend="beam", varmin=False, progress=False)
    assert (plain["score"].to_numpy()[:20] > 1e-3).all()  # never its own copy
    np.testing.assert_allclose(plain["score"].to_numpy()[20:23], 0.0, atol=1e-6)  # a test clip meets it
    with pytest.raises(ValueError, match="beam: some clips have no reference left"):
        scoring.score_group(
            emb[:1], emb[:1], ["source"], backend="beam", varmin=False, loo_index=np.array([0])
        )


def test_beam_refuses_what_it_cannot_do():
    rng = np.random.default_rng(25)
    clips = clip_table(n_source=10, n_target=3, n_normal=2, n_anomaly=2)
    meta = with_channels(clips)
    per_band, flat = rng.normal(size=(len(clips), 2, 4)), rng.normal(size=(len(clips), 8))
    hint = r"needs per-band embeddings \[N, F, D\]: extract with pooling band_rdp/band_mean"
    with pytest.raises(ValueError, match=hint):
        scoring.score_embeddings(meta, flat, backend="beam", progress=False)
    with pytest.raises(ValueError, match=hint):
        scoring.score_group(flat[10:], flat[:10], ["source"] * 10, backend="beam")
    with pytest.raises(ValueError, match=hint):
        scoring.beam_distance(flat, flat)
    train, domain = per_band[:13], ["source"] * 10 + ["target"] * 3
    with pytest.raises(ValueError, match="smote oversampling applies to the knn backend only"):
        scoring.score_group(per_band, train, domain, backend="beam", smote=5)
    with pytest.raises(ValueError, match="needs backend='knn' \\(not 'beam'\\)"):
        scoring.score_group(per_band, train, domain, backend="beam", normalisation="local_density")
    with pytest.raises(ValueError, match=r"needs backend in \('knn', 'mahalanobis'\)"):
        scoring.score_group(
            per_band, train, domain, backend="beam", separate_domains=True, normalisation="domain_mean"
        )
    with pytest.raises(ValueError, match="beam_neighbours must be a positive integer"):
        scoring.score_group(per_band, train, domain, backend="beam", beam_neighbours=0)
    with pytest.raises(ValueError, match="varmin must be True or False"):
        scoring.score_group(per_band, train, domain, backend="beam", varmin="yes")
    with pytest.raises(
        ValueError, match="VarMin needs more than beam_neighbours=4 references, the memory has 3"
    ):
        scoring.score_group(per_band, train, domain, backend="beam", separate_domains=True)
    # separate memories and their z-scores work where the memory is large enough
    scores = scoring.score_group(
        per_band,
        train,
        domain,
        backend="beam",
        separate_domains=True,
        beam_neighbours=1,
        normalisation="domain_zscore",
    )
    assert np.isfinite(scores).all()


def test_score_branches_runs_beam_on_per_band_branches_only():
    rng = np.random.default_rng(26)
    clips = clip_table(n_source=10, n_target=3, n_normal=2, n_anomaly=2)
    meta = with_channels(clips)
    systems = scoring.score_branches(
        {"clip": (meta, rng.normal(size=(len(meta), 8))), "band": (meta, rng.normal(size=(len(meta), 2, 4)))},
        ("knn", "beam"),
        ("near",),
        progress=False,
    )
    assert sorted(systems) == ["band-beam-near", "band-knn-near", "clip-knn-near"]
    with pytest.raises(ValueError, match="backend must be one of"):
        scoring.score_branches({"clip": (meta, rng.normal(size=(len(meta), 8)))}, ("lof",), ("near",))


# --------------------------------------------------------------------------------------------------
# Channel policies: residual scale, the far channel as a noise direction
# --------------------------------------------------------------------------------------------------
def test_residual_scale_is_the_far_gain_and_works_per_band():
    rng = np.random.default_rng(27)
    clips = clip_table(n_source=60, n_target=0, n_normal=30, n_anomaly=30)
    dims = 12
    machine = np.tile(np.eye(dims)[0] * 3, (len(clips), 1)) + 0.1 * rng.normal(size=(len(clips), dims))
    machine[(clips["label"] == "anomaly").to_numpy()] += np.eye(dims)[1] * 1.5
    noise = 6 * rng.normal(size=(len(clips), dims))
    meta = with_channels(clips, ("near", "far"))
    emb = np.concatenate([machine + noise, 2 * noise])  # the far microphone hears the noise twice as loud
    auc = {}
    for scale in (1.0, 0.5):
        scores = scoring.score_embeddings(
            meta, emb, channel_policy="residual", residual_scale=scale, include_train=False, progress=False
        )
        auc[scale] = roc_auc_score(scores["label"] == "anomaly", scores["score"])
    assert auc[0.5] > 0.95 and auc[1.0] < 0.8
    default = scoring.score_embeddings(meta, emb, channel_policy="residual", progress=False)
    explicit = scoring.score_embeddings(
        meta, emb, channel_policy="residual", residual_scale=1, progress=False
    )
    pd.testing.assert_frame_equal(default, explicit)
    # per band: near - a far, each band rescaled to unit length, flattened for knn
    per_band = rng.normal(size=(2 * len(clips), 3, 4))
    banded = scoring.score_embeddings(
        meta, per_band, channel_policy="residual", residual_scale=0.5, progress=False
    )
    residual = _unit_bands(per_band[: len(clips)] - 0.5 * per_band[len(clips) :]).reshape(len(clips), 12)
    by_hand = scoring.score_embeddings(with_channels(clips), residual, progress=False)
    np.testing.assert_allclose(banded["score"], by_hand["score"], atol=1e-5)
    for bad in (float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="residual_scale must be a finite number"):
            scoring.score_embeddings(meta, emb, channel_policy="residual", residual_scale=bad, progress=False)


def _far_noise_world(seed=28, bands=None):
    """near = base + s * (far - mean far): each clip's near embedding carries its own far-channel noise
    direction at a random strength s; anomalies live in base only. 64 dims: removing one direction
    costs base about 1/64 of itself (real embeddings: hundreds of dims)."""
    rng = np.random.default_rng(seed)
    clips = clip_table(n_source=60, n_target=0, n_normal=30, n_anomaly=30)
    shape = (len(clips), 64) if bands is None else (len(clips), bands, 64)
    base = np.zeros(shape)
    base[..., 0] = 3.0
    base += 0.1 * rng.normal(size=shape)
    base[(clips["label"] == "anomaly").to_numpy(), ..., 1] += 1.0
    far = 1.0 + 3.0 * rng.normal(size=shape)
    noise = far - far[:60].mean(axis=0)  # centred on the normal training clips (the references)
    strength = rng.uniform(0, 4, size=shape[:-1] + (1,))
    return clips, base, far, base + strength * noise


def test_orthogonal_policy_ignores_the_far_direction_at_any_strength():
    for bands in (None, 3):
        clips, base, far, near = _far_noise_world(bands=bands)
        meta = with_channels(clips, ("near", "far"))
        noisy = scoring.score_embeddings(
            meta, np.concatenate([near, far]), channel_policy="orthogonal", progress=False
        )
        clean = scoring.score_embeddings(
            meta, np.concatenate([base, far]), channel_policy="orthogonal", progress=False
        )
        np.testing.assert_allclose(noisy["score"], clean["score"], atol=1e-5)
        assert (noisy["channel"] == "orthogonal").all()
        test = noisy["split"] == "test"
        assert roc_auc_score(noisy.loc[test, "label"] == "anomaly", noisy.loc[test, "score"]) > 0.95
        for policy in ("near", "residual"):  # the noise at any strength defeats both
            other = scoring.score_embeddings(
                meta, np.concatenate([near, far]), channel_policy=policy, include_train=False, progress=False
            )
            assert roc_auc_score(other["label"] == "anomaly", other["score"]) < 0.8


def test_remove_far_directions_projects_out_the_clip_direction_and_the_principal_ones():
    clips, _, far, near = _far_noise_world(seed=29)
    reference = ((clips["split"] == "train") & (clips["label"] == "normal")).to_numpy()
    kept = scoring.remove_far_directions(near, far, reference, far_directions=2)
    centred = far - far[reference].mean(axis=0)
    _, _, vt = np.linalg.svd(centred[reference], full_matrices=False)
    np.testing.assert_allclose(kept @ vt[:2].T, 0, atol=1e-9)
    np.testing.assert_allclose(np.einsum("ij,ij->i", kept, centred), 0, atol=1e-8)
    # what is orthogonal to all of them is kept as it was
    span = np.concatenate([vt[:2], centred[:1]])
    q, _ = np.linalg.qr(span.T)
    free = near[0] - q @ (q.T @ near[0])
    np.testing.assert_allclose(kept[0], free, atol=1e-9)
    # a test clip whose far embedding is the references' mean has no direction: nothing removed
    at_mean = far.copy()
    at_mean[70] = far[reference].mean(axis=0)
    np.testing.assert_allclose(scoring.remove_far_directions(near, at_mean, reference)[70], near[70])
    with pytest.raises(ValueError, match="far_directions must be a non-negative integer"):
        scoring.remove_far_directions(near, far, reference, far_directions=-1)
    with pytest.raises(ValueError, match="far_directions=64 must be below"):
        scoring.remove_far_directions(near, far, reference, far_directions=64)
    with pytest.raises(ValueError, match="paired embeddings of one shape"):
        scoring.remove_far_directions(near, far[:, :8], reference)
    meta = with_channels(clips, ("near", "far"))
    # the policy scores the unit-length kept embeddings like a channel of their own
    policy = scoring.score_embeddings(
        meta, np.concatenate([near, far]), channel_policy="orthogonal", far_directions=2, progress=False
    )
    by_hand = scoring.score_embeddings(with_channels(clips), _unit_bands(kept), progress=False)
    np.testing.assert_allclose(policy["score"], by_hand["score"], atol=1e-6)
    with pytest.raises(ValueError, match="far_directions must be a non-negative integer"):
        scoring.score_embeddings(
            meta, np.concatenate([near, far]), channel_policy="orthogonal", far_directions=1.5
        )
    with pytest.raises(ValueError, match="no far embedding"):
        scoring.score_embeddings(with_channels(clips), near, channel_policy="orthogonal", progress=False)


def test_a_residual_policy_can_name_its_own_far_gain():
    rng = np.random.default_rng(0)
    rows = []
    for split, label, n in (("train", "normal", 12), ("test", "normal", 6), ("test", "anomaly", 6)):
        for i in range(n):
            domain = "target" if i % 4 == 0 else "source"
            rows.append(("dev", "fan", "00", split, f"{split}_{label}_{i}.wav", domain, label, "x"))
    clips = pd.DataFrame(rows, columns=[*scoring._ITEM_COLUMNS[:-1], "attributes"])
    items = pd.concat([clips.assign(channel="near"), clips.assign(channel="far")], ignore_index=True)
    emb = rng.normal(size=(len(items), 6))
    named = scoring.score_embeddings(items, emb, channel_policy="residual@0.5", progress=False)
    setting = scoring.score_embeddings(
        items, emb, channel_policy="residual", residual_scale=0.5, progress=False
    )
    np.testing.assert_allclose(named["score"], setting["score"])
    assert set(named["channel"]) == {"residual@0.5"}
    systems = scoring.score_branches(
        {"b": (items, emb)}, ["knn"], ["residual", "residual@0.5"], progress=False
    )
    assert set(systems) == {"b-knn-residual", "b-knn-residual@0.5"}
    with pytest.raises(ValueError, match="expected residual@A with a number"):
        scoring.score_embeddings(items, emb, channel_policy="residual@half", progress=False)


def test_whitened_knn_ignores_the_directions_where_normal_clips_vary_most():
    """Normal clips vary widely along eight nuisance directions; anomalies move along a quiet one. Plain
    cosine KNN is swamped by the nuisance; whitened (and Euclidean) the anomalies stand out."""
    rng = np.random.default_rng(0)

    def clips(n, shift):
        x = np.concatenate([rng.normal(size=(n, 8)) * 2.0, rng.normal(size=(n, 8)) * 0.1], axis=1)
        x[:, 0] += 3.0
        x[:, 9] += shift  # the anomaly: a move along a quiet direction
        return x

    ref, test = clips(100, 0.0), np.concatenate([clips(50, 0.0), clips(50, 0.8)])
    truth = np.r_[np.zeros(50), np.ones(50)]
    domains = np.array(["source"] * 100)
    plain = scoring.score_group(test, ref, domains, backend="knn")
    white = scoring.score_group(test, ref, domains, backend="knn_white", shrinkage=0.01)  # little shrinkage
    assert roc_auc_score(truth, white) > 0.95 and roc_auc_score(truth, plain) < 0.7
    assert scoring.BACKENDS[:3] == ("knn", "mahalanobis", "beam") and "knn_white" in scoring.BACKENDS
    with pytest.raises(ValueError, match="smote"):
        scoring.score_group(test, ref, domains, backend="knn_white", smote=10)
