"""Difficulty calibration of a development set: how well does a simple detector do on it, per channel?

The detector: per clip, the mean and standard deviation over time of a 64-band log-mel spectrogram
(n_fft 1024, hop 512) of one channel; anomaly score = distance (cosine or euclidean) to the nearest
normal training clip of the same machine (KNN, k = 1, source and target references together, no
domain adaptation). Scored with the official metrics (``kit.metrics``) per machine and overall.

Channels: ``near`` and ``far`` as recorded; each canceller of ``kit.denoise`` (``w1``, ``ss``, ``w3``,
``wv``, ``wl``: the near channel cleaned with the far one as a noise reference); and ``clean``, the
machine signal alone at the near microphone, where the dataset knows it: a ``kit.synth`` dataset
re-renders it from its deterministic plan (nothing extra is written to disk), a ``kit.mix`` dataset
reads the mono clip its near channel was mixed from. ``clean`` against ``near`` shows the gap the
noise opens, each canceller against ``near`` the part of it the canceller closes.

``python -m kit.tools.synth_check ROOT`` (``dcase-kit synth-check ROOT``) reports, for every channel the
dataset has (``--channels`` picks some): a summary (official score and mean AUCs per channel, hmean per
machine and channel); per channel the per-machine AUC(source), AUC(target), pAUC and hmean, the
leave-one-out 1-NN accuracy of predicting a training clip's attributes from the same features (is there
something for a proxy classifier to learn?) and, when ``ROOT/synth_clips.csv`` exists (a ``kit.synth``
dataset), the AUC per anomaly kind and severity tercile; for a ``kit.synth`` dataset also the measured
levels per machine (near and far machine-to-noise ratios, far machine level against the near one). It
exits with status 1 when the synthetic dataset misses its calibration: the near-channel official score
outside [0.55, 0.80], the far channel not harder than the near channel, the target domain not harder
than the source, or the clean signal not clearly easier than the near channel (by ``CLEAN_MARGIN``). It
works on real development sets too (mono sets: the near channel only; the calibration verdict is then
only informative).
"""

from __future__ import annotations

import argparse
import functools
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

from kit import denoise, mix, synth
from kit.files import read_dataset_record
from kit.metrics import official_score, section_metrics

SAMPLE_RATE = 16_000
CLEAN = "clean"
CHANNELS = {"near": 0, "far": 1}
METRICS = ("cosine", "euclidean")
CALIBRATION_RANGE = (0.55, 0.80)
LEVELS = "_levels"  # the key of the measured levels in check()'s results (not a channel)
CLEAN_MARGIN = 0.05  # the clean signal must beat the near channel by this much official score
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


def channel_names(root: str | Path) -> list[str]:
    """The channels :func:`check` can score on ``root``: ``clean`` where the dataset knows its machine
    signal (kit.synth, kit.mix), ``near``, and for stereo clips ``far`` and every canceller."""
    clips = development_clips(root)
    stereo = sf.info(clips["path"].iloc[0]).channels >= 2
    try:
        names = [CLEAN] if clean_source(root) is not None else []
    except ValueError:  # e.g. written by an older kit.synth: its clean signal cannot be re-rendered
        names = []
    return names + (["near", "far", *denoise.CANCELLERS] if stereo else ["near"])


def _check_channels(channels: Sequence[str]) -> None:
    known = [CLEAN, *CHANNELS, *denoise.CANCELLERS]
    unknown = [c for c in channels if c not in known]
    if unknown or not channels:
        raise ValueError(f"unknown or no channels {unknown or list(channels)}; expected some of {known}")


def clean_source(root: str | Path):
    """A function ``path -> clean near-microphone machine signal`` for a dataset that knows it, or None.

    kit.synth datasets re-render each clip from its deterministic plan (nothing extra on disk); kit.mix
    datasets read the mono clip the near channel was mixed from (its machine part, unscaled).
    """
    root = Path(root)
    if any((root / name).exists() for name in (synth.RECORD_NAME, synth.LEGACY_RECORD_NAME)):
        return _SynthClean(root)
    if any((root / name).exists() for name in (mix.RECORD_NAME, mix.LEGACY_RECORD_NAME)):
        return lambda path: mix.clean_near(root, path)
    return None


class _SynthClean:
    """Re-renders the machine part of a kit.synth clip's near channel, quantised as the files are."""

    def __init__(self, root: Path):
        record = read_dataset_record(root, synth.RECORD_NAME, "kit.synth", (), synth.LEGACY_RECORD_NAME)
        if record.get("generator_version") != synth.GENERATOR_VERSION:
            raise ValueError(
                f"{root} was generated by kit.synth version {record.get('generator_version')}, this is "
                f"version {synth.GENERATOR_VERSION}: its clean signal cannot be re-rendered; generate again"
            )
        self.root, self.seed = root.resolve(), int(record["seed"])
        self.plans = {
            plan.relative_path: plan
            for machine in record["machines"]
            for plan in synth.plan_machine(machine, scale=record["scale"], seed=self.seed)
        }
        self.levels: dict[str, tuple[float, float, float]] = {}

    def render(self, path: str | Path) -> synth.RenderedClip:
        relative = Path(path).resolve().relative_to(self.root).as_posix()
        if relative not in self.plans:
            raise ValueError(f"{path}: not a clip of the kit.synth dataset at {self.root}")
        return synth.render_clip(self.plans[relative], self.seed)

    def __call__(self, path: str | Path) -> np.ndarray:
        clip = self.render(path)
        self.levels[str(path)] = _clip_levels(clip)  # kept for machine_levels: rendering is the cost
        machine = clip.near_machine
        return (np.round(np.clip(machine, -1.0, 32767 / 32768) * 32768) / 32768).astype(np.float32)


def _read(path: str) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE}")
    return audio


def channel_wave(path: str, channel: str, clean=None) -> np.ndarray:
    """One clip's waveform for ``channel``: ``near``/``far`` as recorded, a canceller's output of the
    stereo pair, or ``clean`` (the machine signal, from ``clean``: see :func:`clean_source`)."""
    if channel == CLEAN:
        if clean is None:
            raise ValueError(f"{path}: no clean signal known (only kit.synth and kit.mix datasets have one)")
        return clean(path)
    audio = _read(path)
    needed = CHANNELS.get(channel, 1)
    if audio.shape[1] <= needed:
        raise ValueError(f"{path}: {audio.shape[1]} channel(s), the {channel} channel needs a stereo clip")
    if channel in CHANNELS:
        return audio[:, CHANNELS[channel]]
    return denoise.cancel_numpy(audio[:, :2].T, channel)


def logmel_feature(wave: np.ndarray) -> np.ndarray:
    """(128,): mean and std over time of each band of a 64-band log-mel (n_fft 1024, hop 512)."""
    logmel = 10.0 * torch.log10(_melspec()(torch.as_tensor(wave, dtype=torch.float32)) + 1e-10)
    return torch.cat([logmel.mean(dim=1), logmel.std(dim=1)]).numpy()


@functools.lru_cache(maxsize=1)
def _melspec() -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=512, n_mels=64, power=2.0
    )


def channel_features(
    paths: Sequence[str], channels: Sequence[str], clean=None, progress: bool = False
) -> dict[str, np.ndarray]:
    """{channel: (clips, 128) log-mel statistics}, reading each clip once for all channels."""
    _check_channels(channels)
    features = {channel: [] for channel in channels}
    for path in tqdm(paths, desc="log-mel statistics", unit="clip", disable=not progress):
        for channel in channels:
            features[channel].append(logmel_feature(channel_wave(path, channel, clean)))
    return {channel: np.stack(rows) for channel, rows in features.items()}


def logmel_statistics(paths: Sequence[str], channel: str = "near", progress: bool = False) -> np.ndarray:
    """(clips, 128): mean and std over time of each band of a 64-band log-mel of one channel (``near``,
    ``far`` or a canceller of kit.denoise)."""
    if channel == CLEAN or channel not in [*CHANNELS, *denoise.CANCELLERS]:
        raise ValueError(f"unknown channel {channel!r}; expected one of {[*CHANNELS, *denoise.CANCELLERS]}")
    return channel_features(paths, [channel], progress=progress)[channel]


def machine_levels(source: _SynthClean, clips: pd.DataFrame) -> pd.DataFrame:
    """Per machine of a kit.synth dataset: the near and far machine-to-noise ratios and the far machine
    level against the near one (dB; min, mean, max over ``clips``), measured on the re-rendered clips."""
    rows = []
    for machine, group in clips.groupby("machine"):
        levels = np.array([source.levels.get(p) or _clip_levels(source.render(p)) for p in group["path"]])
        row = {"machine": machine}
        for i, name in enumerate(("near SNR", "far SNR", "far/near machine")):
            row[name] = f"{levels[:, i].min():.1f} / {levels[:, i].mean():.1f} / {levels[:, i].max():.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _clip_levels(clip: synth.RenderedClip) -> tuple[float, float, float]:
    near_noise, far_noise = clip.near - clip.near_machine, clip.far - clip.far_machine
    return (
        _ratio_db(clip.near_machine, near_noise),
        _ratio_db(clip.far_machine, far_noise),
        _ratio_db(clip.far_machine, clip.near_machine),
    )


def _ratio_db(signal: np.ndarray, reference: np.ndarray) -> float:
    return float(10.0 * np.log10(np.sum(np.square(signal, dtype=np.float64)) / np.sum(np.square(reference))))


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
    channels: Sequence[str] | None = None,
    metric: str = "cosine",
    progress: bool = True,
) -> dict:
    """Score the development set of ``root`` with the log-mel KNN detector, per channel (default: every
    channel of :func:`channel_names`).

    Returns {channel: {"sections": per-machine metrics DataFrame, "official": float,
    "attributes": {machine: (accuracy, chance)}, "kinds": DataFrame or None}}, in channel order; for a
    kit.synth dataset whose clean channel is scored also ``results[LEVELS]``, the measured levels per
    machine (:func:`machine_levels`; ``LEVELS`` is not a channel name).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    root = Path(root)
    channels = channel_names(root) if channels is None else list(channels)
    _check_channels(channels)
    clips = development_clips(root)
    clean = clean_source(root) if CLEAN in channels else None
    if CLEAN in channels and clean is None:
        raise ValueError(f"{root}: no clean signal known (only kit.synth and kit.mix datasets have one)")
    features = channel_features(clips["path"].tolist(), channels, clean, progress)
    results = {}
    for channel in channels:
        clips = clips.assign(score=np.nan)
        attributes = {}
        for _, group in clips.groupby("machine"):
            train = (group["split"] == "train").to_numpy()
            test = ~train
            clips.loc[group.index[test], "score"] = knn_scores(
                features[channel][group.index[train]], features[channel][group.index[test]], metric
            )
            labels = group.loc[train, "attributes"]
            if labels.nunique() > 1:
                chance = float(labels.value_counts(normalize=True).max())
                attributes[group["machine"].iloc[0]] = (
                    attribute_accuracy(features[channel][group.index[train]], labels),
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
    if isinstance(clean, _SynthClean):
        results[LEVELS] = machine_levels(clean, clips)
    return results


def _channels(results: dict) -> dict:
    return {name: result for name, result in results.items() if name != LEVELS}


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
        clean = results.get(CLEAN)
        if clean is not None and clean["official"] < near["official"] + CLEAN_MARGIN:
            failures.append(
                f"clean signal not clearly easier than near ({clean['official']:.4f} < "
                f"{near['official']:.4f} + {CLEAN_MARGIN})"
            )
    return failures


def summary_table(results: dict) -> pd.DataFrame:
    """One row per channel: official score, mean AUC(source), AUC(target), pAUC, and hmean per machine."""
    rows = []
    for channel, result in _channels(results).items():
        sections = result["sections"]
        row = {
            "channel": channel,
            "official": result["official"],
            "auc_source": sections["auc_source"].mean(),
            "auc_target": sections["auc_target"].mean(),
            "pauc": sections["pauc"].mean(),
        }
        row.update({f"hmean {m}": h for m, h in zip(sections["machine"], sections["hmean"])})
        rows.append(row)
    return pd.DataFrame(rows)


def report(results: dict) -> str:
    """The check's results as plain text tables."""
    lines = [
        "== summary (official score = hmean over machines; mean AUCs over machines)",
        summary_table(results).to_string(index=False, float_format="%.4f"),
        "",
    ]
    levels = results.get(LEVELS)
    if levels is not None:
        lines += [
            "== measured levels per machine (dB over the development clips: min / mean / max)",
            levels.to_string(index=False, float_format="%.1f"),
            "",
        ]
    for channel, result in _channels(results).items():
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


def main(argv: list[str] | None = None, prog: str = "python -m kit.tools.synth_check") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset root holding dev_data/raw/<machine>/{train,test}")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument(
        "--channels",
        nargs="+",
        choices=[CLEAN, *CHANNELS, *denoise.CANCELLERS],
        help="channels to score (default: every channel the dataset has)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    results = check(args.root, channels=args.channels, metric=args.metric, progress=not args.quiet)
    print(report(results))
    failures = calibration_failures(results)
    for failure in failures:
        print(f"CALIBRATION MISSED: {failure}")
    if not failures and "near" in results:
        met = ["near official score in range", "target harder than source"]
        met += ["far harder than near"] if "far" in results else []
        met += ["clean clearly easier than near"] if CLEAN in results else []
        print(f"calibration met: {', '.join(met)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
