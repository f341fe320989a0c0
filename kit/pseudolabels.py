"""Pseudo-labels for machines without attribute labels: KMeans clusters of frozen-backbone features.

A machine whose clips carry no attributes (``noAttribute``) gives the proxy task one class per section,
which says nothing about its operating modes. As in kasahart/asd-experiments (69.53 dev), the normal
training clips of such a machine are clustered instead, per machine and section and per domain:
``k_source`` KMeans clusters of the source clips (default 7) and ``k_target`` of the target clips
(default 1), seeded (default 42). Each training clip gets the class
``<machine>|<section>|pseudo-<domain>-<cluster>``; cluster 0 is the largest of its group.

Features (``pseudo_features``):

- ``"backbone"``: the run's pretrained backbone (``TrainConfig.backbone`` / ``checkpoint``), frozen, with
  a parameter-free pooling: for a backbone with a time x frequency grid (``has_grid``, and
  ``kit.heads.band_mean`` present) the mean over time of every frequency band, flattened (the source's
  frequency-preserving "AP" features); otherwise ``[mean; std]`` of the tokens over time. A backbone
  without pretrained weights (no checkpoint, e.g. the cnn trained from scratch) would give meaningless
  clusters, and one that needs a noise reference is not run alone: for those the log-mel statistics are
  used, with a warning;
- ``"logmel"``: the per-band log-mel ``[mean; std]`` of ``kit.models.statistics_embedder``.

Clips are embedded whole, on the first channel of the run (``TrainConfig.channels``: the near channel,
or a canceller such as ``w1`` as in the source).

A group with fewer clips than its ``k`` gets ``min(k, n)`` clusters and a warning naming the machine,
section, domain and both counts (a tiny dataset, or a machine with few target clips, still trains).

The labels are saved with the run, ``<run_dir>/pseudo_labels/<name>.csv`` (written atomically): YAML
settings in ``# `` comment lines (k, seed, KMeans restarts, the feature source, the channel), then one
row per clip: ``file_name, dataset, machine, section, domain, cluster, label``. A later call (a resumed
training, the report) reads the file instead of clustering again when its settings and clips are
those asked for; other settings or clips are refused with the differences named.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from kit import backbones, data, heads
from kit.files import write_text_atomic

FEATURES = ("backbone", "logmel")
FOLDER = "pseudo_labels"
N_INIT = 10  # KMeans restarts (k-means++ seeds), the best inertia kept
COLUMNS = ("file_name", "dataset", "machine", "section", "domain", "cluster", "label")
KEY = ("dataset", "machine", "file_name")  # a file name repeats across machines (and dev/eval)


def file_path(run_dir: str | os.PathLike, name: str) -> Path:
    """``<run_dir>/pseudo_labels/<name>.csv``: the pseudo-labels of training run ``name``."""
    return Path(run_dir) / FOLDER / f"{name}.csv"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_settings(k_source, k_target, seed, features="backbone") -> None:
    """Refuse k below 1, a seed that is not an integer >= 0 and an unknown feature source (the
    ``pseudo_*`` settings of ``kit.train.TrainConfig``)."""
    for name, value in (("pseudo_k_source", k_source), ("pseudo_k_target", k_target)):
        if not _is_int(value) or value < 1:
            raise ValueError(
                f"{name} must be an integer >= 1 (clusters per machine and domain), got {value!r}"
            )
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"pseudo_seed must be an integer >= 0, got {seed!r}")
    if features not in FEATURES:
        raise ValueError(f"unknown pseudo_features {features!r}: expected one of {FEATURES}")


def settings_of(cfg, channel: str) -> dict:
    """What decides the pseudo-labels of training config ``cfg`` (a ``kit.train.TrainConfig``), as
    recorded in the file and compared on reuse: k, seed, restarts, the feature source and channel."""
    from kit.models import file_fingerprint

    check_settings(cfg.pseudo_k_source, cfg.pseudo_k_target, cfg.pseudo_seed, cfg.pseudo_features)
    settings = {
        "k_source": int(cfg.pseudo_k_source),
        "k_target": int(cfg.pseudo_k_target),
        "seed": int(cfg.pseudo_seed),
        "n_init": N_INIT,
        "features": cfg.pseudo_features,
        "channel": channel,
    }
    if channel not in data.CHANNEL_INDEX:  # a canceller: its settings change the audio
        settings["canceller_settings"] = dict((cfg.canceller_settings or {}).get(channel) or {})
    if cfg.pseudo_features == "backbone":
        settings.update(
            backbone=cfg.backbone,
            checkpoint=cfg.checkpoint,
            checkpoint_sha1=file_fingerprint(cfg.checkpoint),
            backbone_config=cfg.backbone_config,
            backbone_options=dict(cfg.backbone_options or {}),
        )
    return settings


# ----------------------------------------------------------------------------------------------
# Features


class FrozenFeatures(nn.Module):
    """A frozen backbone with a parameter-free pooling: ``(waves, lengths) -> [B, F]``. Per-band mean
    over time, flattened (``F = bands * D``), when the backbone has a grid and ``kit.heads`` offers
    ``band_mean``; ``[mean; std]`` of the tokens over time (``F = 2 * D``) otherwise."""

    def __init__(self, backbone: backbones.Backbone):
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.grid = bool(getattr(backbone, "has_grid", False)) and hasattr(heads, "band_mean")
        self.pooling = "band_mean" if self.grid else "mean_std"
        self.stats = None if self.grid else heads.make_head("stats", backbone.embed_dim, None)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.grid:
            tokens, padding_mask = self.backbone.grid_tokens(waves, lengths)
            return heads.band_mean(tokens, padding_mask).flatten(1)
        tokens, padding_mask = self.backbone(waves, lengths)
        return self.stats(tokens, padding_mask)


def _logmel_fallback(reason: str) -> tuple[nn.Module, dict]:
    from kit.models import statistics_embedder

    warnings.warn(
        f"pseudo-labels: {reason}, so the clips are clustered on log-mel statistics "
        "(kit.models.statistics_embedder) instead",
        stacklevel=3,
    )
    return statistics_embedder(), {"source": "logmel", "pooling": "mean_std"}


def feature_extractor(cfg) -> tuple[nn.Module, dict]:
    """The clip-feature model for ``cfg.pseudo_features`` and a description of what it is (recorded in
    the file): the frozen pretrained backbone, or the log-mel statistics (asked for, or the fallback)."""
    from kit.models import statistics_embedder

    if cfg.pseudo_features == "logmel":
        return statistics_embedder(), {"source": "logmel", "pooling": "mean_std"}
    if cfg.checkpoint is None:
        return _logmel_fallback(
            f"the {cfg.backbone} backbone of this run has no pretrained weights (no checkpoint; random "
            "initialisation gives meaningless clusters)"
        )
    backbone = backbones.load(cfg.backbone, cfg.checkpoint, **dict(cfg.backbone_options or {}))
    if not backbone.pretrained:
        return _logmel_fallback(f"the {cfg.backbone} backbone loaded from {cfg.checkpoint} is not pretrained")
    if backbone.takes_reference:
        return _logmel_fallback(f"the {cfg.backbone} backbone needs a noise reference beside the clip")
    model = FrozenFeatures(backbone)
    return model, {"source": f"backbone {cfg.backbone}", "pooling": model.pooling}


def compute_features(
    clips: pd.DataFrame, cfg, channel: str, *, device=None, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """``(features [len(clips), F], description)`` of whole clips on ``channel``."""
    from kit.embed import compute_embeddings

    model, described = feature_extractor(cfg)
    _, features = compute_embeddings(
        model,
        clips.drop(columns=["channel"], errors="ignore"),
        channels=(channel,),
        canceller_settings=cfg.canceller_settings,
        batch_size=16,
        num_workers=cfg.num_workers,
        precision=cfg.precision,
        device=device,
        progress=progress,
    )
    del model  # the frozen backbone is not needed again: free its memory before training starts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return features, {**described, "dim": int(features.shape[1])}


# ----------------------------------------------------------------------------------------------
# Clustering


def _by_size(assigned: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered by size, largest first (ties: the lower KMeans id), empty ones dropped."""
    ids, inverse, counts = np.unique(assigned, return_inverse=True, return_counts=True)
    order = np.lexsort((ids, -counts))  # the old position of the new id 0, 1, ...
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank[inverse]


def cluster(
    features: np.ndarray,
    clips: pd.DataFrame,
    *,
    k_source: int = 7,
    k_target: int = 1,
    seed: int = 42,
    n_init: int = N_INIT,
    progress: bool = True,
) -> np.ndarray:
    """The cluster of every clip ``[len(clips)]``: KMeans per (machine, section, domain) with
    ``k_source`` clusters of the source clips and ``k_target`` of the target ones (``min(k, n)`` with a
    warning for a group of ``n < k`` clips), numbered by size within the group."""
    from sklearn.cluster import KMeans

    check_settings(k_source, k_target, seed)
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(clips):
        raise ValueError(
            f"expected one feature row per clip ([{len(clips)}, F]), got an array of shape {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError("pseudo-label features contain NaN or inf")
    bad = sorted(set(clips["domain"].astype(str)) - {"source", "target"})
    if bad:
        raise ValueError(f"pseudo-labels need the domain of every clip (source or target), found {bad}")
    out = np.full(len(clips), -1, dtype=np.int64)
    groups = clips.groupby(["machine", "section", "domain"], sort=True).indices
    for (machine, section, domain), rows in tqdm(groups.items(), desc="kmeans", disable=not progress):
        k = k_source if domain == "source" else k_target
        if len(rows) < k:
            warnings.warn(
                f"pseudo-labels: {machine} section {section} has {len(rows)} {domain} training clips, fewer "
                f"than the {k} clusters asked for (pseudo_k_{domain}): using {len(rows)} clusters",
                stacklevel=2,
            )
            k = len(rows)
        if k == 1:
            out[rows] = 0
            continue
        model = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
        out[rows] = _by_size(model.fit_predict(features[rows]))
    return out


def pseudo_names(domains: pd.Series, clusters: pd.Series) -> pd.Series:
    """The pseudo-label part of the class names: ``pseudo-<domain>-<cluster>``."""
    return "pseudo-" + domains.astype(str) + "-" + clusters.astype(int).astype(str)


# ----------------------------------------------------------------------------------------------
# The file


def clips_to_label(items: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """The distinct training clips of ``items`` (one row per clip, whatever the channels) whose class
    under ``scheme`` is a pseudo-label, in a stable order."""
    if scheme not in data.PSEUDO_SCHEMES:
        raise ValueError(f"label scheme {scheme!r} uses no pseudo-labels (those are {data.PSEUDO_SCHEMES})")
    clips = items.drop_duplicates(list(KEY))
    if "split" in clips.columns:
        clips = clips[clips["split"] == "train"]
    clips = clips[data.needs_pseudo_label(clips, scheme)]
    return clips.sort_values(list(KEY), kind="stable").reset_index(drop=True)


def write(path: str | os.PathLike, settings: dict, table: pd.DataFrame) -> Path:
    """The settings as ``# `` YAML lines, then the table as CSV; atomically."""
    header = "".join(f"# {line}\n" for line in yaml.safe_dump(settings, sort_keys=False).splitlines())
    return write_text_atomic(path, header + table.loc[:, list(COLUMNS)].to_csv(index=False))


def read(path: str | os.PathLike) -> tuple[dict, pd.DataFrame]:
    """``(settings, table)`` of a pseudo-label file written by :func:`write`."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    n_header = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    try:
        settings = yaml.safe_load("".join(line[2:] for line in lines[:n_header])) or {}
        table = pd.read_csv(
            io.StringIO("".join(lines[n_header:])),
            dtype={"section": str, "file_name": str, "dataset": str, "machine": str, "domain": str},
            keep_default_na=False,
        )
    except (yaml.YAMLError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise ValueError(f"{path} is not a pseudo-label file written by kit.pseudolabels: {err}") from err
    missing = [c for c in COLUMNS if c not in table.columns]
    if not isinstance(settings, dict) or missing:
        raise ValueError(
            f"{path} is not a pseudo-label file written by kit.pseudolabels (missing columns {missing} "
            "or settings header)"
        )
    return settings, table


def _refuse_other(path: Path, saved: dict, wanted: dict, table: pd.DataFrame, clips: pd.DataFrame) -> None:
    keys = sorted(set(saved) | set(wanted))
    saved_checkpoint_ok = wanted.get("checkpoint_sha1") is not None and saved.get(
        "checkpoint_sha1"
    ) == wanted.get("checkpoint_sha1")
    differing = [
        k
        for k in keys
        if k not in ("feature_source",)
        and saved.get(k) != wanted.get(k)
        and not (k == "checkpoint" and saved_checkpoint_ok)  # the same file, moved
    ]
    changes = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differing]
    have = set(map(tuple, table.loc[:, list(KEY)].astype(str).to_numpy()))
    need = set(map(tuple, clips.loc[:, list(KEY)].astype(str).to_numpy()))
    if have != need:
        changes.append(
            f"clips: {len(need - have)} to label are not in the file, {len(have - need)} in it are not asked for"
        )
    if changes:
        raise ValueError(
            f"{path} holds pseudo-labels of other settings or clips ({'; '.join(changes)}); use another name "
            "(or run_dir) for the new settings, or delete that file to cluster again"
        )


def ensure(
    items: pd.DataFrame, cfg, run_dir: str | os.PathLike, *, device=None, progress: bool = True
) -> Path | None:
    """The pseudo-label file of training config ``cfg`` over the training ``items`` (one row per clip
    and channel, as ``kit.train.training_items`` gives them): read when present with the same settings
    and clips, else the features are computed, clustered and the file written. None when no clip needs a
    pseudo-label (``attribute_pseudo`` where every clip has attributes)."""
    clips = clips_to_label(items, cfg.label_scheme)
    if clips.empty:
        return None
    channel = str(items["channel"].iloc[0]) if "channel" in items.columns else cfg.channels[0]
    wanted = settings_of(cfg, channel)
    path = file_path(run_dir, cfg.name)
    if path.exists():
        saved, table = read(path)
        _refuse_other(path, saved, wanted, table, clips)
        return path
    features, described = compute_features(clips, cfg, channel, device=device, progress=progress)
    clusters = cluster(
        features,
        clips,
        k_source=wanted["k_source"],
        k_target=wanted["k_target"],
        seed=wanted["seed"],
        n_init=wanted["n_init"],
        progress=progress,
    )
    table = clips.loc[:, ["file_name", "dataset", "machine", "section", "domain"]].assign(cluster=clusters)
    names = pseudo_names(table["domain"], table["cluster"])
    table["label"] = table["machine"].astype(str) + "|" + table["section"].astype(str) + "|" + names
    return write(path, {**wanted, "feature_source": described}, table)


def attach(items: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``items`` with the ``data.PSEUDO_COLUMN`` (``pseudo-<domain>-<cluster>``) of the clips the
    table lists ("" for the others)."""
    names = pd.Series(
        pseudo_names(table["domain"], table["cluster"]).to_numpy(),
        index=pd.MultiIndex.from_frame(table.loc[:, list(KEY)].astype(str)),
    )
    keys = pd.MultiIndex.from_frame(items.loc[:, list(KEY)].astype(str))
    return items.assign(**{data.PSEUDO_COLUMN: names.reindex(keys).fillna("").to_numpy()})


def label_items(
    items: pd.DataFrame, cfg, run_dir: str | os.PathLike, *, place=None, progress: bool = True
) -> pd.DataFrame:
    """The training ``items`` with their pseudo-labels (``kit.train.train`` calls this for the pseudo
    label schemes before ``data.make_labels``): the file is made (or checked) by rank 0 and read by
    every rank. ``place``: the ``kit.train`` process placement (None: one process, default device)."""
    import torch.distributed as dist

    rank, distributed = (0, False) if place is None else (place.rank, place.distributed)
    device = None if place is None else place.device
    if rank == 0:
        ensure(items, cfg, run_dir, device=device, progress=progress)
    if distributed:
        dist.barrier()
    path = file_path(run_dir, cfg.name)
    if clips_to_label(items, cfg.label_scheme).empty:
        return items
    return attach(items, read(path)[1])


def summary(path: str | os.PathLike) -> dict:
    """What the run manifest records of a pseudo-label file: where, its settings, the number of
    pseudo-label classes and the clips of each."""
    settings, table = read(path)
    counts = table["label"].value_counts().sort_index()
    return {
        "file": str(path),
        "settings": settings,
        "classes": int(len(counts)),
        "clips": int(len(table)),
        "clips_per_class": {str(k): int(v) for k, v in counts.items()},
    }
