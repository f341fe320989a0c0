"""KMeans pseudo-labels: clustering per machine/section/domain, the label schemes that use them, the
file saved with the run (reused, refused when its settings differ), and training end to end."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from kit import data, manifest, models, pseudolabels, train

SR = 16000

# machine -> [(domain, attribute string, tone Hz, clips)]: "fan" has attributes, "valve" none and two
# operating modes in its source clips (what the pseudo-labels should find), one in its target clips.
PLAN = {
    "fan": [("source", "spd_1", 300.0, 4), ("source", "spd_2", 900.0, 4), ("target", "spd_1", 600.0, 2)],
    "valve": [
        ("source", "noAttribute", 2000.0, 5),
        ("source", "noAttribute", 4500.0, 3),
        ("target", "noAttribute", 3000.0, 2),
    ],
}


def _write_dataset(root: Path, seconds: float = 0.5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    for machine, groups in PLAN.items():
        number = 0
        for domain, attributes, f0, n in groups:
            folder = root / "dev_data" / "raw" / machine / "train"
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                near = 0.3 * np.sin(2 * np.pi * f0 * (1 + 0.01 * rng.standard_normal()) * t)
                near = near + 0.02 * rng.standard_normal(len(t))
                far = 0.1 * near + 0.05 * rng.standard_normal(len(t))
                name = f"section_00_{domain}_train_normal_{number:04d}_{attributes}.wav"
                sf.write(folder / name, np.stack([near, far], 1).astype(np.float32), SR, subtype="PCM_16")
                number += 1
    test = root / "dev_data" / "raw" / "valve" / "test"  # test clips are never clustered
    test.mkdir(parents=True, exist_ok=True)
    sf.write(test / "section_00_source_test_anomaly_0000_noAttribute.wav", np.zeros((SR // 2, 2)), SR)
    return data.build_index(root, progress=False)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("pseudo"))


def _cfg(**kw) -> train.TrainConfig:
    base = dict(
        name="cnn_pseudo",
        backbone="cnn",
        backbone_config="unit",
        head="mean",
        embed_dim=8,
        loss="arcface",
        loss_s=16.0,
        loss_m=0.2,
        label_scheme="pseudo",
        pseudo_k_source=2,
        pseudo_k_target=1,
        channels=("near",),
        train_datasets=("dev",),
        crop_seconds=0.4,
        steps=3,
        batch_size=4,
        warmup_steps=1,
        num_workers=0,
        spec_augment=False,
    )
    base.update(kw)
    return train.TrainConfig.from_dict(base)


def _mode(index: pd.DataFrame) -> pd.Series:
    """The true operating mode of every clip of the plan (its tone), by file name order."""
    modes = {}
    for machine, groups in PLAN.items():
        number = 0
        for domain, _, f0, n in groups:
            for _ in range(n):
                modes[(machine, number)] = f"{domain}-{f0:g}"
                number += 1
    numbers = index["file_name"].str.extract(r"normal_(\d+)_")[0].astype(int)
    return pd.Series([modes[(m, k)] for m, k in zip(index["machine"], numbers)], index=index.index)


# ----------------------------------------------------------------------------------------------
# Clustering


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = {"a": np.full(6, 5.0), "b": np.full(6, -5.0), "t": np.zeros(6)}
    truth = ["a"] * 6 + ["b"] * 3 + ["t"] * 4
    features = np.stack([centres[c] + 0.3 * rng.standard_normal(6) for c in truth])
    clips = pd.DataFrame(
        {"machine": "valve", "section": "00", "domain": ["source"] * 9 + ["target"] * 4, "truth": truth}
    )
    return features, clips


def test_kmeans_finds_the_modes_per_domain_numbered_by_size_and_seeded():
    features, clips = _blobs()
    got = pseudolabels.cluster(features, clips, k_source=2, k_target=1, seed=42, progress=False)
    assert got.tolist() == [0] * 6 + [1] * 3 + [0] * 4  # the larger source mode is cluster 0
    again = pseudolabels.cluster(features, clips, k_source=2, k_target=1, seed=42, progress=False)
    assert np.array_equal(got, again)
    # two target clusters split the target clips only; sections and machines never mix
    other = clips.assign(section=["00"] * 5 + ["01"] * 4 + ["00"] * 4)
    split = pseudolabels.cluster(features, other, k_source=1, k_target=2, seed=0, progress=False)
    assert set(split[:5]) == {0} and set(split[5:9]) == {0} and set(split[9:]) == {0, 1}


def test_more_clusters_than_clips_falls_back_to_one_per_clip_with_a_warning():
    features, clips = _blobs()
    with pytest.warns(UserWarning, match=r"valve section 00 has 4 target training clips, fewer than the 7"):
        got = pseudolabels.cluster(features, clips, k_source=2, k_target=7, seed=42, progress=False)
    assert sorted(got[9:]) == [0, 1, 2, 3]


def test_clustering_bad_input_is_named():
    features, clips = _blobs()
    with pytest.raises(ValueError, match=r"one feature row per clip \(\[13, F\]\)"):
        pseudolabels.cluster(features[:5], clips, progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        pseudolabels.cluster(np.where(features > 4, np.nan, features), clips, progress=False)
    with pytest.raises(ValueError, match=r"source or target\), found \['unknown'\]"):
        pseudolabels.cluster(features, clips.assign(domain="unknown"), progress=False)
    with pytest.raises(ValueError, match="pseudo_k_source must be an integer >= 1"):
        pseudolabels.cluster(features, clips, k_source=0, progress=False)


def test_settings_are_checked_by_the_training_config():
    for key, value, message in [
        ("pseudo_k_source", 0, "pseudo_k_source must be an integer >= 1"),
        ("pseudo_k_target", 1.5, "pseudo_k_target must be an integer >= 1"),
        ("pseudo_k_target", True, "pseudo_k_target must be an integer >= 1"),
        ("pseudo_seed", -1, "pseudo_seed must be an integer >= 0"),
        ("pseudo_features", "mfcc", "unknown pseudo_features 'mfcc'"),
        ("label_scheme", "pseudolabels", "unknown label scheme 'pseudolabels'"),
    ]:
        with pytest.raises(ValueError, match=message):
            _cfg(**{key: value})
    with pytest.raises(ValueError, match="unknown label scheme 'pseudolabel'"):
        data.make_labels(pd.DataFrame({"machine": ["a"]}), "pseudolabel")


# ----------------------------------------------------------------------------------------------
# Label schemes


def _frame():
    return pd.DataFrame(
        {
            "machine": ["fan", "fan", "fan", "valve", "valve", "valve", "valve"],
            "section": ["00"] * 7,
            "split": ["train"] * 6 + ["test"],
            "domain": ["source", "source", "target", "source", "source", "target", "source"],
            "attributes": ["spd_1", "spd_2", "spd_1"] + ["noAttribute"] * 4,
            "pseudo_label": [
                "pseudo-source-0",
                "pseudo-source-1",
                "pseudo-target-0",
                "pseudo-source-0",
                "pseudo-source-1",
                "pseudo-target-0",
                "",
            ],
        }
    )


def test_pseudo_schemes_build_their_classes():
    frame = _frame()
    codes, classes = data.make_labels(frame, "pseudo")
    assert classes == [
        "fan|00|pseudo-source-0",
        "fan|00|pseudo-source-1",
        "fan|00|pseudo-target-0",
        "valve|00|pseudo-source-0",
        "valve|00|pseudo-source-1",
        "valve|00|pseudo-target-0",
    ]
    assert codes.tolist() == [0, 1, 2, 3, 4, 5, -1]  # a test row has no class
    codes, classes = data.make_labels(frame, "attribute_pseudo")
    assert classes == [
        "fan|00|spd_1|source",
        "fan|00|spd_1|target",
        "fan|00|spd_2|source",
        "valve|00|pseudo-source-0",
        "valve|00|pseudo-source-1",
        "valve|00|pseudo-target-0",
    ]
    assert codes.tolist() == [0, 2, 1, 3, 4, 5, -1]


def test_attribute_pseudo_without_any_machine_lacking_attributes_is_attribute_and_domain():
    frame = _frame()
    frame = frame[frame["machine"] == "fan"].drop(columns="pseudo_label")
    with pytest.warns(UserWarning, match="every training clip has attributes"):
        codes, classes = data.make_labels(frame, "attribute_pseudo")
    expected = data.make_labels(frame, "composite")  # no channel column: machine+section+attributes+domain
    assert classes == expected[1] and np.array_equal(codes, expected[0])


def test_a_missing_pseudo_label_is_named():
    frame = _frame()
    frame.loc[4, "pseudo_label"] = ""
    with pytest.raises(data.DatasetError, match=r"1 rows of machines \['valve'\] have none"):
        data.make_labels(frame, "attribute_pseudo")
    with pytest.raises(data.DatasetError, match=r"pseudo-label \(column 'pseudo_label'\)"):
        data.make_labels(frame.drop(columns="pseudo_label"), "pseudo")
    # attribute rows need none: only the noAttribute machine's are asked for
    fans = frame.assign(pseudo_label=np.where(frame["machine"] == "fan", "", frame["pseudo_label"]))
    fans.loc[4, "pseudo_label"] = "pseudo-source-1"
    assert len(data.make_labels(fans, "attribute_pseudo")[1]) == 6


# ----------------------------------------------------------------------------------------------
# The file and its reuse


def _items(index, cfg):
    return train.training_items(index, cfg)


def test_the_file_is_written_reused_and_refused_for_other_settings(index, tmp_path, monkeypatch):
    cfg = _cfg()
    items = _items(index, cfg)
    with pytest.warns(UserWarning, match="cnn backbone of this run has no pretrained weights"):
        path = pseudolabels.ensure(items, cfg, tmp_path, progress=False)
    assert path == tmp_path / "pseudo_labels" / "cnn_pseudo.csv"
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary left behind
    settings, table = pseudolabels.read(path)
    assert settings["k_source"] == 2 and settings["k_target"] == 1 and settings["seed"] == 42
    assert settings["feature_source"]["source"] == "logmel" and settings["channel"] == "near"
    assert path.read_text().startswith("# k_source: 2\n")
    assert list(table.columns) == list(pseudolabels.COLUMNS)
    assert len(table) == 20 and set(table["machine"]) == {"fan", "valve"}
    assert (
        table["label"]
        == table["machine"] + "|00|pseudo-" + table["domain"] + "-" + table["cluster"].astype(str)
    ).all()
    # the clusters are the tones: each true mode falls in one cluster, different modes apart
    modes = _mode(table).to_numpy()
    for machine in ("fan", "valve"):
        rows = (table["machine"] == machine).to_numpy()
        pairs = set(zip(modes[rows], table.loc[rows, "label"]))
        assert len(pairs) == len(set(modes[rows])) == len(set(table.loc[rows, "label"])) == 3
    # reused as it is: no features are computed again
    monkeypatch.setattr(pseudolabels, "compute_features", lambda *a, **k: pytest.fail("clustered again"))
    before = path.read_bytes()
    assert pseudolabels.ensure(items, cfg, tmp_path, progress=False) == path
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=r"other settings or clips \(k_source: 2 -> 3\)"):
        pseudolabels.ensure(items, dataclasses.replace(cfg, pseudo_k_source=3), tmp_path, progress=False)
    fewer = items[items["machine"] == "valve"]
    with pytest.raises(
        ValueError, match=r"clips: 0 to label are not in the file, 10 in it are not asked for"
    ):
        pseudolabels.ensure(fewer, cfg, tmp_path, progress=False)
    (tmp_path / "junk.csv").write_text("# k: [\nnot,a,table\n")
    with pytest.raises(ValueError, match="junk.csv is not a pseudo-label file"):
        pseudolabels.read(tmp_path / "junk.csv")


def test_attribute_pseudo_clusters_only_the_machines_without_attributes(index, tmp_path):
    cfg = _cfg(label_scheme="attribute_pseudo", pseudo_features="logmel")
    items = _items(index, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logmel asked for: no fallback warning
        path = pseudolabels.ensure(items, cfg, tmp_path, progress=False)
    _, table = pseudolabels.read(path)
    assert set(table["machine"]) == {"valve"} and len(table) == 10
    labelled = pseudolabels.attach(items, table)
    assert (labelled.loc[labelled["machine"] == "fan", "pseudo_label"] == "").all()
    assert (labelled.loc[labelled["machine"] == "valve", "pseudo_label"].str.startswith("pseudo-")).all()
    fans = items[items["machine"] == "fan"]
    assert pseudolabels.ensure(fans, cfg, tmp_path / "fans", progress=False) is None  # nothing to cluster
    assert not (tmp_path / "fans").exists()


def test_pretrained_backbone_features(index, tmp_path, backbone_fixtures):
    cfg = _cfg(
        name="beats_pseudo",
        backbone="beats",
        backbone_config=None,
        checkpoint=str(backbone_fixtures / "beats_release.pt"),
    )
    clips = pseudolabels.clips_to_label(_items(index, cfg), "pseudo")
    model, described = pseudolabels.feature_extractor(cfg)
    assert described["source"] == "backbone beats" and not any(p.requires_grad for p in model.parameters())
    features, described = pseudolabels.compute_features(clips, cfg, "near", progress=False)
    backbone = model.backbone
    if model.grid:  # per band mean over time, flattened (the source's frequency-preserving features)
        waves = torch.from_numpy(data.read_clip(clips["path"].iloc[0], "near", data.LengthPolicy("none"))[0])
        with torch.no_grad():
            tokens, _ = backbone.grid_tokens(waves[None], torch.tensor([waves.shape[0]]))
        assert described["pooling"] == "band_mean"
        assert features.shape == (len(clips), tokens.shape[2] * backbone.embed_dim)
        torch.testing.assert_close(
            torch.from_numpy(features[0]), tokens[0].mean(dim=0).flatten(), atol=1e-4, rtol=1e-4
        )
    else:
        assert described["pooling"] == "mean_std" and features.shape == (len(clips), 2 * backbone.embed_dim)
    settings = pseudolabels.settings_of(cfg, "near")
    assert settings["checkpoint_sha1"] == models.file_fingerprint(cfg.checkpoint)


# ----------------------------------------------------------------------------------------------
# Training end to end


@pytest.mark.parametrize(
    "scheme, expected",
    [
        (
            "pseudo",
            [
                "fan|00|pseudo-source-0",
                "fan|00|pseudo-source-1",
                "fan|00|pseudo-target-0",
                "valve|00|pseudo-source-0",
                "valve|00|pseudo-source-1",
                "valve|00|pseudo-target-0",
            ],
        ),
        (
            "attribute_pseudo",
            [
                "fan|00|spd_1|source",
                "fan|00|spd_1|target",
                "fan|00|spd_2|source",
                "valve|00|pseudo-source-0",
                "valve|00|pseudo-source-1",
                "valve|00|pseudo-target-0",
            ],
        ),
    ],
)
def test_training_with_pseudo_labels_end_to_end(index, tmp_path, monkeypatch, scheme, expected):
    cfg = _cfg(label_scheme=scheme, loss="subcluster_adacos", subcenters=4, checkpoint_every=1)
    with pytest.warns(UserWarning, match="no pretrained weights"):
        train.train(index, cfg, tmp_path, progress=False, stop_after=1)
    path = pseudolabels.file_path(tmp_path, cfg.name)
    _, table = pseudolabels.read(path)
    assert len(table) == (20 if scheme == "pseudo" else 10)
    assert (tmp_path / cfg.name / "classes.txt").read_text().split() == expected
    # the resumed run reads the file: no clustering again
    monkeypatch.setattr(pseudolabels, "compute_features", lambda *a, **k: pytest.fail("clustered again"))
    out = train.train(index, cfg, tmp_path, progress=False)
    history = pd.read_csv(out / "history.csv")
    assert len(history) == cfg.steps and np.isfinite(history["loss"]).all()
    manifest.record_branch(
        tmp_path, cfg.name, backbone="cnn", model_dir=out
    )  # its branch carries the model's record
    entry = manifest.branch(tmp_path, cfg.name)["pseudo_labels"]
    assert entry["file"] == "pseudo_labels/cnn_pseudo.csv" and entry["classes"] == (
        6 if scheme == "pseudo" else 3
    )
    assert sum(entry["clips_per_class"].values()) == len(table) and entry["settings"]["k_source"] == 2
