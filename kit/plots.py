"""The figures the notebooks show, each saved as a PNG beside the run's other outputs.

Every function takes plain data (DataFrames, arrays), draws one figure, saves it (atomically) when
``path`` is given and returns the matplotlib Figure so a notebook displays it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt  # headless machines fall back to Agg; Jupyter sets its inline backend
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from kit.files import atomic_path


def _save(fig, path):
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return fig


def close(fig) -> None:
    """Free a figure that is saved and not shown (a long run must not keep every figure open)."""
    plt.close(fig)


def training_curves(history: pd.DataFrame, path=None, title: str = "") -> plt.Figure:
    """Loss and proxy accuracy per step (with a moving average), and the learning rate."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    window = max(1, len(history) // 20)
    for ax, column in zip(axes, ("loss", "accuracy", "lr")):
        ax.plot(history["step"], history[column], alpha=0.35 if column != "lr" else 1.0)
        if column != "lr":
            ax.plot(history["step"], history[column].rolling(window, min_periods=1).mean())
        ax.set_xlabel("step")
        ax.set_title(column if column != "accuracy" else "proxy accuracy")
    fig.suptitle(title)
    return _save(fig, path)


def embedding_projection(
    items: pd.DataFrame,
    emb: np.ndarray,
    path=None,
    color_by=("machine", "domain", "channel"),
    max_points: int = 3000,
    seed: int = 0,
) -> plt.Figure:
    """2-D PCA of L2-normalised embeddings, one panel per column in ``color_by``."""
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(emb), size=min(max_points, len(emb)), replace=False))
    x = emb[keep] / np.linalg.norm(emb[keep], axis=1, keepdims=True).clip(1e-12)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    columns = [c for c in color_by if c in items.columns]
    fig, axes = plt.subplots(1, len(columns), figsize=(5 * len(columns), 4.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        values = items[column].iloc[keep].astype(str).to_numpy()
        for value in sorted(set(values)):
            sel = values == value
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, label=value)
        ax.set_title(f"PCA coloured by {column}")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    return _save(fig, path)


def score_histograms(scores: pd.DataFrame, path=None, title: str = "") -> plt.Figure:
    """Per machine: test-score histograms of normal vs anomalous clips, source and target apart."""
    test = scores[(scores["split"] == "test") & (scores["label"].isin(["normal", "anomaly"]))]
    machines = sorted(test["machine"].unique())
    fig, axes = plt.subplots(1, max(1, len(machines)), figsize=(4 * max(1, len(machines)), 3), squeeze=False)
    for ax, machine in zip(axes[0], machines):
        part = test[test["machine"] == machine]
        bins = np.histogram_bin_edges(part["score"], bins=20)
        for (label, domain), group in part.groupby(["label", "domain"]):
            ax.hist(group["score"], bins=bins, alpha=0.45, label=f"{label}/{domain}")
        ax.set_title(machine)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def roc_curves(scores: pd.DataFrame, path=None, title: str = "") -> plt.Figure:
    """Per machine: ROC of source-domain and target-domain evaluation (official masks)."""
    test = scores[(scores["split"] == "test") & (scores["label"].isin(["normal", "anomaly"]))]
    machines = sorted(test["machine"].unique())
    fig, axes = plt.subplots(
        1, max(1, len(machines)), figsize=(3.6 * max(1, len(machines)), 3.4), squeeze=False
    )
    for ax, machine in zip(axes[0], machines):
        part = test[test["machine"] == machine]
        y = (part["label"] == "anomaly").to_numpy()
        for domain in ("source", "target"):
            mask = (part["domain"] == domain).to_numpy() | y
            if len(set(y[mask])) == 2:
                fpr, tpr, _ = roc_curve(y[mask], part["score"].to_numpy()[mask])
                ax.plot(fpr, tpr, label=domain)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.axvline(0.1, color="grey", lw=0.6)
        ax.set_title(machine)
        ax.set_xlabel("FPR")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def near_far_pair(
    near: np.ndarray, far: np.ndarray, sample_rate: int = 16000, path=None, title: str = ""
) -> plt.Figure:
    """Waveforms and log-mel spectrograms of the two microphones of one clip."""
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=1024, hop_length=256, n_mels=64)
    fig, axes = plt.subplots(2, 2, figsize=(12, 5))
    for col, (name, wave) in enumerate((("near", near), ("far", far))):
        t = np.arange(len(wave)) / sample_rate
        axes[0, col].plot(t, wave, lw=0.4)
        axes[0, col].set_title(f"{name} channel")
        spec = 10 * torch.log10(mel(torch.from_numpy(np.asarray(wave, dtype=np.float32))) + 1e-10).numpy()
        axes[1, col].imshow(
            spec, origin="lower", aspect="auto", extent=(0, t[-1] if len(t) else 0, 0, spec.shape[0])
        )
        axes[1, col].set_xlabel("time (s)")
        axes[1, col].set_ylabel("mel band")
    fig.suptitle(title)
    return _save(fig, path)


def duration_histogram(index: pd.DataFrame, path=None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3))
    for machine, group in index.groupby("machine"):
        ax.hist(group["duration"], bins=np.arange(0, 18, 0.5), alpha=0.5, label=machine)
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("clips")
    ax.legend(fontsize=7)
    return _save(fig, path)


def system_comparison(results: pd.DataFrame, path=None) -> plt.Figure:
    """Official score of every system (rows with machine == 'overall'), best first."""
    overall = results[results["machine"] == "overall"].sort_values("hmean")
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(overall) + 1.2))
    ax.barh(overall["system"], overall["hmean"])
    ax.set_xlabel("official score (hmean)")
    ax.set_xlim(max(0.0, float(overall["hmean"].min()) - 0.1), min(1.0, float(overall["hmean"].max()) + 0.05))
    return _save(fig, path)
