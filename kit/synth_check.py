"""Difficulty calibration of a development set: how well does a simple detector do on it?

The detector: per clip, the mean and standard deviation over time of a 64-band log-mel spectrogram
(n_fft 1024, hop 512) of one channel; anomaly score = distance (cosine or euclidean) to the nearest
normal training clip of the same machine (KNN, k = 1, source and target references together, no
domain adaptation). Scored with the official metrics (``kit.metrics``) per machine and overall.

``python -m kit.synth_check ROOT`` reports, for the near and the far channel: per-machine AUC(source),
AUC(target), pAUC and hmean, and the official score; the leave-one-out 1-NN accuracy of predicting a
training clip's attributes from the same features (is there something for a proxy classifier to
learn?); and, when ``ROOT/synth_clips.csv`` exists (a ``kit.synth`` dataset), the AUC per anomaly kind
and severity tercile. It exits with status 1 when the synthetic dataset misses its calibration: the
near-channel official score outside [0.55, 0.80], the far channel not harder than the near channel,
or the target domain not harder than the source. It works on real development sets too (the
calibration verdict is then only informative).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from kit.metrics import official_score, section_metrics

SAMPLE_RATE = 16_000
CHANNELS = {"near": 0, "far": 1}
METRICS = ("cosine", "euclidean")
CALIBRATION_RANGE = (0.55, 0.80)
NAME_PATTERN = re.compile(
    r"^section_(?P<section>\d+)_(?P<domain>source|target)_(?P<split>train|test)_(?P<label>normal|anomaly)"
    r"_(?P<index>\d+)_(?P<attributes>.+)\.wav$"
)


def development_clips(root: str | Path) -> pd.DataFrame:
    """Every development clip under ``root/dev_data/raw``: path, machine, section, split, domain, label,
    attributes, file_name (parsed from the official names)."""
    raw = Path(root) / "dev_data" / "raw"
    if not raw.is_dir():
        raise FileNotFoundError(f"no development set at {raw} (expected <root>/dev_data/raw/<machine>/...)")
    rows = []
    for path in sorted(raw.glob("*/*/*.wav")):
        match = NAME_PATTERN.match(path.name)
        if match is None or path.parent.name not in ("train", "test"):
            raise ValueError(f"{path}: not an official development clip name (section_00_source_train_...)")
        rows.append(
            {"path": str(path), "machine": path.parts[-3], "file_name": path.name, **match.groupdict()}
        )
    if not rows:
        raise FileNotFoundError(f"no WAV clips under {raw}/<machine>/{{train,test}}")
    return pd.DataFrame(rows)


def logmel_statistics(paths: Sequence[str], channel: str = "near", progress: bool = False) -> np.ndarray:
    """(clips, 128): mean and std over time of each band of a 64-band log-mel of one channel."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; expected one of {list(CHANNELS)}")
    melspec = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=512, n_mels=64, power=2.0
    )
    features = []
    for path in tqdm(paths, desc=f"log-mel ({channel})", unit="clip", disable=not progress):
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        if rate != SAMPLE_RATE:
            raise ValueError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE}")
        if audio.shape[1] <= CHANNELS[channel]:
            raise ValueError(
                f"{path}: {audio.shape[1]} channel(s), the {channel} channel needs a stereo clip"
            )
        logmel = 10.0 * torch.log10(melspec(torch.from_numpy(audio[:, CHANNELS[channel]])) + 1e-10)
        features.append(torch.cat([logmel.mean(dim=1), logmel.std(dim=1)]).numpy())
    return np.stack(features)


def _distances(queries: np.ndarray, references: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        r = references / np.linalg.norm(references, axis=1, keepdims=True)
        return 1.0 - q @ r.T
    if metric == "euclidean":
        squared = (
            (queries**2).sum(1)[:, None] + (references**2).sum(1)[None, :] - 2.0 * queries @ references.T
        )
        return np.sqrt(np.maximum(squared, 0.0))
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def knn_scores(train: np.ndarray, test: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Anomaly score of each test row: distance to its nearest training row (k = 1)."""
    return _distances(test, train, metric).min(axis=1)


def attribute_accuracy(features: np.ndarray, labels: Sequence[str], metric: str = "cosine") -> float:
    """Leave-one-out 1-NN accuracy of predicting ``labels`` from standardised ``features``."""
    standard = (features - features.mean(0)) / (features.std(0) + 1e-8)
    distances = _distances(standard, standard, metric)
    np.fill_diagonal(distances, np.inf)
    labels = np.asarray(labels)
    return float(np.mean(labels[distances.argmin(axis=1)] == labels))


def _kind_table(root: Path, clips: pd.DataFrame) -> pd.DataFrame | None:
    """AUC of the normal test clips against each anomaly kind and each severity tercile."""
    table_path = root / "synth_clips.csv"
    if not table_path.exists():
        return None
    truth = pd.read_csv(table_path, keep_default_na=False)
    truth["file_name"] = truth["path"].str.rsplit("/", n=1).str[-1]
    test = clips[clips["split"] == "test"].merge(truth[["machine", "file_name", "anomaly", "severity"]])
    rows = []
    for machine, group in test.groupby("machine"):
        normal = group[group["label"] == "normal"]
        anomalous = group[group["label"] == "anomaly"]
        terciles = pd.qcut(anomalous["severity"], 3, labels=["low", "mid", "high"], duplicates="drop")
        subsets = [(f"kind {kind}", part) for kind, part in anomalous.groupby("anomaly")]
        subsets += [
            (f"severity {tercile}", part) for tercile, part in anomalous.groupby(terciles, observed=True)
        ]
        for subset, part in subsets:
            y = np.r_[np.zeros(len(normal)), np.ones(len(part))]
            auc = roc_auc_score(y, np.r_[normal["score"], part["score"]])
            rows.append({"machine": machine, "anomalies": subset, "n": len(part), "auc": auc})
    return pd.DataFrame(rows)


def check(
    root: str | Path,
    *,
    channels: Sequence[str] = ("near", "far"),
    metric: str = "cosine",
    progress: bool = True,
) -> dict:
    """Score the development set of ``root`` with the log-mel KNN detector, per channel.

    Returns {channel: {"sections": per-machine metrics DataFrame, "official": float,
    "attributes": {machine: (accuracy, chance)}, "kinds": DataFrame or None}}.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    root = Path(root)
    clips = development_clips(root)
    results = {}
    for channel in channels:
        clips = clips.assign(score=np.nan)
        features = logmel_statistics(clips["path"].tolist(), channel, progress)
        attributes = {}
        for _, group in clips.groupby("machine"):
            train = (group["split"] == "train").to_numpy()
            test = ~train
            clips.loc[group.index[test], "score"] = knn_scores(
                features[group.index[train]], features[group.index[test]], metric
            )
            labels = group.loc[train, "attributes"]
            if labels.nunique() > 1:
                chance = float(labels.value_counts(normalize=True).max())
                attributes[group["machine"].iloc[0]] = (
                    attribute_accuracy(features[group.index[train]], labels),
                    chance,
                )
        test = clips[clips["split"] == "test"]
        sections = section_metrics(test[["machine", "section", "file_name", "score", "label", "domain"]])
        official = official_score(sections[["auc_source", "auc_target", "pauc"]].to_numpy().ravel())
        results[channel] = {
            "sections": sections,
            "official": official,
            "attributes": attributes,
            "kinds": _kind_table(root, test),
        }
    return results


def calibration_failures(results: dict) -> list[str]:
    """Why a synthetic development set misses its calibration (empty when it meets it)."""
    failures = []
    low, high = CALIBRATION_RANGE
    near = results.get("near")
    if near is not None:
        if not low <= near["official"] <= high:
            failures.append(f"near-channel official score {near['official']:.4f} outside [{low}, {high}]")
        source, target = near["sections"]["auc_source"].mean(), near["sections"]["auc_target"].mean()
        if target >= source:
            failures.append(f"target domain not harder than source (mean AUC {target:.4f} >= {source:.4f})")
        far = results.get("far")
        if far is not None and far["official"] >= near["official"]:
            failures.append(
                f"far channel not harder than near ({far['official']:.4f} >= {near['official']:.4f})"
            )
    return failures


def report(results: dict) -> str:
    """The check's results as plain text tables."""
    lines = []
    for channel, result in results.items():
        table = result["sections"][["machine", "auc_source", "auc_target", "pauc", "hmean"]]
        lines += [
            f"== {channel} channel: official score (hmean) {result['official']:.4f}",
            table.to_string(index=False, float_format="%.4f"),
        ]
        for machine, (accuracy, chance) in result["attributes"].items():
            lines.append(f"attribute 1-NN accuracy {machine}: {accuracy:.3f} (majority class {chance:.3f})")
        if result["kinds"] is not None:
            lines += [
                "AUC by anomaly kind / severity tercile:",
                result["kinds"].to_string(index=False, float_format="%.3f"),
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit.synth_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset root holding dev_data/raw/<machine>/{train,test}")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--channels", nargs="+", choices=list(CHANNELS), default=["near", "far"])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    results = check(args.root, channels=args.channels, metric=args.metric, progress=not args.quiet)
    print(report(results))
    failures = calibration_failures(results)
    for failure in failures:
        print(f"CALIBRATION MISSED: {failure}")
    if not failures:
        print(
            "calibration met: near official score in range, far harder than near, target harder than source"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
