"""Embedding extraction with an on-disk cache.

Every clip of the index is embedded once per channel (near, far) by a fine-tuned embedder, streamed in
batches of clips of similar duration (little padding; the backbones are batch invariant, so padding
does not change a clip's embedding). Results are cached under
``<run_dir>/embeddings/<name>-<key>/{meta.csv, emb.npy}``, where ``key`` hashes the model weights,
the clips (path, size, modification time), the channels, the length policy and the windowing: a re-run
with the same inputs loads the cache instead of recomputing, and any change gives a new key.

Windowed extraction (``window_seconds``): each clip is cut into overlapping windows of the length the
model was trained on, every window is embedded and the clip's embedding is the mean of its windows.
A model fine-tuned on short crops then sees the whole clip at the length it knows (and a backbone with
a fixed input length, like EAT's ``target_length``, no longer drops the end of a long clip).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kit import data
from kit.files import atomic_path


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, values)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(
    index: pd.DataFrame, channels, length: data.LengthPolicy, window: tuple | None = None
) -> str:
    digest = hashlib.sha1()
    for path in index["path"]:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    described = [list(channels), length.mode, length.seconds] + ([list(window)] if window else [])
    digest.update(json.dumps(described).encode())
    return digest.hexdigest()


def window_starts(n_samples: int, window: int, hop: int) -> np.ndarray:
    """Start samples of the windows that cover a clip of ``n_samples``: every ``hop`` samples, plus
    one window ending at the clip's end so that no audio is left out. A clip no longer than one
    window is one window (the clip itself)."""
    if n_samples <= window:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, n_samples - window + 1, hop, dtype=np.int64)
    if starts[-1] != n_samples - window:
        starts = np.append(starts, n_samples - window)
    return starts


def _check_window(window_seconds: float | None, window_hop: float | None) -> tuple | None:
    if window_seconds is None:
        return None
    hop = window_seconds / 2 if window_hop is None else window_hop
    if not window_seconds > 0 or not hop > 0:
        raise ValueError(
            f"window_seconds and window_hop must be > 0 seconds, got {window_seconds!r} and {window_hop!r}"
        )
    return float(window_seconds), float(hop)


def _embed_waves(embedder, waves, device, autocast: bool, batch_size: int) -> np.ndarray:
    """Embeddings ``[len(waves), D]`` of a list of 1-D waves, ``batch_size`` waves per forward pass."""
    out = []
    for start in range(0, len(waves), batch_size):
        part = waves[start : start + batch_size]
        lengths = torch.tensor([len(w) for w in part])
        padded = torch.zeros(len(part), int(lengths.max()))
        for j, w in enumerate(part):
            padded[j, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(embedder(padded.to(device), lengths.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def _batches(index: pd.DataFrame, batch_size: int):
    """Rows sorted by duration, cut into batches: similar lengths share a batch."""
    order = np.argsort(index["duration"].to_numpy(), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def compute_embeddings(
    embedder: torch.nn.Module,
    index: pd.DataFrame,
    *,
    channels=("near", "far"),
    length: data.LengthPolicy | None = None,
    window_seconds: float | None = None,
    window_hop: float | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Embed every clip of ``index`` for every channel. Returns ``(meta, emb)``: ``meta`` holds the
    index columns plus ``channel``, one row per (clip, channel) in index order, channel-major.

    ``length`` brings each clip to length first; with ``window_seconds`` the result is then cut into
    windows (``window_hop`` apart, default half a window, see ``window_starts``) and the clip's
    embedding is the mean of its windows' embeddings."""
    length = length or data.LengthPolicy(mode="none")
    window = _check_window(window_seconds, window_hop)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedder = embedder.to(device).eval()
    index = index.reset_index(drop=True)
    autocast = device.type == "cuda"
    if "far" in channels and (index["channels"] < 2).any():
        mono = index.loc[index["channels"] < 2, "path"].iloc[0]
        raise ValueError(
            f"channel 'far' requested but {mono} is mono; embed channels=('near',) for mono data"
        )
    # Each file is decoded once per batch and every requested channel is cut from it.
    decode_as = "both" if "far" in channels else "near"
    pick = {"near": 0, "far": 1}
    out = {channel: None for channel in channels}
    bar = tqdm(total=(len(index) + batch_size - 1) // batch_size, desc="embed", disable=not progress)
    for batch in _batches(index, batch_size):
        clips = [data.load_audio(index["path"].iloc[i], channel=decode_as) for i in batch]
        for channel in channels:
            waves = [length.apply(c[pick[channel]] if decode_as == "both" else c, None) for c in clips]
            if window is None:
                emb = _embed_waves(embedder, waves, device, autocast, batch_size)
            else:
                size, hop = (max(1, round(x * data.SAMPLE_RATE)) for x in window)
                owner, pieces = [], []
                for j, w in enumerate(waves):
                    for start in window_starts(len(w), size, hop):
                        owner.append(j)
                        pieces.append(w[start : start + size])
                per_window = _embed_waves(embedder, pieces, device, autocast, batch_size)
                owner = np.asarray(owner)
                emb = np.zeros((len(waves), per_window.shape[1]), dtype=np.float32)
                np.add.at(emb, owner, per_window)
                emb /= np.bincount(owner, minlength=len(waves))[:, None]
            if out[channel] is None:
                out[channel] = np.zeros((len(index), emb.shape[1]), dtype=np.float32)
            out[channel][batch] = emb
        bar.update(1)
    for channel, values in out.items():
        if not np.isfinite(values).all():
            bad = index["path"].iloc[int(np.flatnonzero(~np.isfinite(values).all(1))[0])]
            raise FloatingPointError(f"non-finite embedding for {bad} ({channel} channel)")
    parts = [out[channel] for channel in channels]
    metas = [index.assign(channel=channel) for channel in channels]
    bar.close()
    return pd.concat(metas, ignore_index=True), np.concatenate(parts)


def extract(
    embedder: torch.nn.Module,
    index: pd.DataFrame,
    run_dir: str | os.PathLike,
    name: str,
    *,
    channels=("near", "far"),
    length: data.LengthPolicy | None = None,
    window_seconds: float | None = None,
    window_hop: float | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, np.ndarray, Path]:
    """``compute_embeddings`` behind the cache. Returns ``(meta, emb, cache_folder)``."""
    length = length or data.LengthPolicy(mode="none")
    window = _check_window(window_seconds, window_hop)
    fingerprint = data_fingerprint(index, channels, length, window)
    key = hashlib.sha1((model_fingerprint(embedder) + fingerprint).encode())
    folder = Path(run_dir) / "embeddings" / f"{name}-{key.hexdigest()[:12]}"
    if (folder / "emb.npy").exists() and (folder / "meta.csv").exists():
        return load(folder) + (folder,)
    meta, emb = compute_embeddings(
        embedder,
        index,
        channels=channels,
        length=length,
        window_seconds=window_seconds,
        window_hop=window_hop,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        meta.to_csv(tmp / "meta.csv", index=False)
        np.save(tmp / "emb.npy", emb)
    return meta, emb, folder


def load(folder: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a cached ``(meta, emb)`` pair."""
    folder = Path(folder)
    for part in ("meta.csv", "emb.npy"):
        if not (folder / part).exists():
            raise FileNotFoundError(
                f"{folder / part} not found: not an embedding folder written by kit.embed"
            )
    meta = pd.read_csv(folder / "meta.csv", dtype={"section": str, "attributes": str}, keep_default_na=False)
    emb = np.load(folder / "emb.npy")
    if len(meta) != len(emb):
        raise ValueError(f"{folder}: meta.csv has {len(meta)} rows but emb.npy has {len(emb)}")
    return meta, emb


def latest(run_dir: str | os.PathLike, name: str) -> Path:
    """The most recently written embedding folder of ``name`` under ``run_dir``."""
    found = sorted((Path(run_dir) / "embeddings").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no embeddings named {name!r} under {Path(run_dir) / 'embeddings'}: run its notebook first"
        )
    return found[-1]
