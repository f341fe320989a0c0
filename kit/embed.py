"""Embedding extraction with an on-disk cache.

Every clip of the index is embedded once per channel (near, far) by a fine-tuned embedder, streamed in
batches of clips of similar duration (little padding; the backbones are batch invariant, so padding
does not change a clip's embedding). Results are cached under
``<run_dir>/embeddings/<name>-<key>/{items.csv, emb.npy}``, where ``key`` hashes the model weights,
the clips (path, size, modification time), the channels, the length policy and the windowing: a re-run
with the same inputs loads the cache instead of recomputing, and any change gives a new key.

Windowed extraction (``window_seconds``): each clip is cut into overlapping windows of the length the
model was trained on, every window is embedded and the clip's embedding is the mean of its windows.
A model fine-tuned on short crops then sees the whole clip at the length it knows (and a backbone with
a fixed input length, like EAT's ``target_length``, no longer drops the end of a long clip).

A backbone that takes a noise reference (``takes_reference``, NA-BEATs) gets the far channel of the
same clip, brought to the same length and cut into the same windows, beside every channel it embeds
(near, a canceller; ``far`` itself only when asked for, with itself as its reference). Such a backbone
needs stereo clips: mono data is an error naming a mono file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kit import data, heads, manifest
from kit.files import atomic_path
from kit.manifest import COLLAPSE_COSINE

# "head": the embedder's own head, [N, D]; the others pool the backbone's grid tokens per band, [N, F, D]
POOLINGS = ("head",) + heads.BAND_POOLINGS


@dataclass(frozen=True)
class ExtractConfig:
    """How the branch notebooks (02-08) embed every clip (their ``extraction`` mapping, through
    ``from_dict`` / ``for_index``).

    ``length_mode``/``seconds``: the clip as recorded (``"none"``, the default: the backbones are
    batch invariant), or zero-padded/cut to ``seconds`` (``"pad_or_cut"``, EAT-ASP's 16 s) or a fixed
    crop. ``mask_padding``: the backbone is told how much of the input is audio, so added zeros are
    masked; False feeds the padding as input (EAT-ASP). ``window_seconds``/``window_hop``: embed
    overlapping windows and average them (see the module docstring). ``pooling``: ``"head"`` (the
    embedder's head: clip embeddings ``[N, D]``) or ``"band_mean"``/``"band_rdp"`` (the backbone's
    own tokens before the head, kept per frequency band and pooled over time: per-band embeddings
    ``[N, F, D]``, RDP with ``rdp_gamma``; see :func:`kit.heads.rdp_pool`)."""

    channels: tuple[str, ...] = ("near", "far")  # microphones and cancellers (w1, ss, ...: kit.denoise)
    canceller_settings: dict = dataclasses.field(default_factory=dict)  # canceller name -> settings
    mono_fallback: bool = False  # on mono data, leave out channels that need the far microphone
    length_mode: str = "none"
    seconds: float | None = None
    mask_padding: bool = True
    window_seconds: float | None = None
    window_hop: float | None = None
    batch_size: int = 16
    num_workers: int | None = None  # decoding processes beside the model; None: kit.data.default_workers()
    precision: str = "auto"  # kit.precision: bf16 autocast on 8.0+ GPUs, fp16 on 7.x, fp32 on the CPU
    pooling: str = "head"  # "head" [N, D], or per band over time: "band_mean" / "band_rdp" [N, F, D]
    rdp_gamma: float = heads.RDP_GAMMA

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        for channel in self.channels:
            data.check_channel(channel)
        self.length_policy()  # validates length_mode and seconds
        _check_window(self.window_seconds, self.window_hop)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"extraction batch_size must be a positive integer, got {self.batch_size!r}")
        _check_pooling(self.pooling, self.rdp_gamma)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> ExtractConfig:
        if not isinstance(values, dict):
            raise ValueError(f"extraction settings must be a mapping of ExtractConfig fields, got {values!r}")
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise ValueError(
                f"unknown extraction setting(s) {unknown}; valid settings: {sorted(cls.fields())}"
            )
        values = dict(values)
        if isinstance(values.get("channels"), str):
            values["channels"] = (values["channels"],)
        return cls(**values)

    @classmethod
    def for_index(cls, values: dict, index: pd.DataFrame) -> ExtractConfig:
        """``from_dict`` for a dataset: on a mono dataset the default channels become the near channel;
        named channels that need the far microphone are an error there unless ``mono_fallback``."""
        settings = cls.from_dict(values)
        fallback = settings.mono_fallback or "channels" not in values  # the default channels adapt
        return dataclasses.replace(
            settings, channels=data.usable_channels(settings.channels, index, mono_fallback=fallback)
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    def length_policy(self) -> data.LengthPolicy:
        return data.LengthPolicy(mode=self.length_mode, seconds=self.seconds)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, values)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(
    index: pd.DataFrame,
    channels,
    length: data.LengthPolicy,
    window: tuple | None = None,
    mask_padding: bool = True,
    canceller_settings: dict | None = None,
) -> str:
    digest = hashlib.sha1()
    for path in index["path"]:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    described = [list(channels), length.mode, length.seconds] + ([list(window)] if window else [])
    if not mask_padding:  # only then, so caches written before this setting existed stay valid
        described.append("padding-as-input")
    described += data.canceller_key(channels, canceller_settings)  # cancellers and their settings
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


def _check_pooling(pooling: str, rdp_gamma: float) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"extraction pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    heads.BandPool("band_rdp", rdp_gamma)  # checks the gamma, whatever the pooling (a setting is a setting)


class _GridEmbedder(torch.nn.Module):
    """An embedder's backbone with per-band pooling over time in place of its head: ``(waves, lengths)
    -> [B, F, D]`` from ``backbone.grid_tokens`` (the tokens before the head's projection)."""

    def __init__(self, embedder: torch.nn.Module, pooling: str, rdp_gamma: float):
        super().__init__()
        self.backbone = getattr(embedder, "backbone", embedder)
        if not getattr(self.backbone, "has_grid", False):
            name = getattr(self.backbone, "name", "") or type(self.backbone).__name__
            raise ValueError(
                f"extraction pooling={pooling!r} pools the backbone's tokens per frequency band, but the "
                f"{name} backbone has no time x frequency grid (has_grid is False): use pooling='head'"
            )
        self.pool = heads.BandPool(pooling, rdp_gamma)

    def forward(self, waves, lengths, reference=None, reference_lengths=None) -> torch.Tensor:
        tokens, padding_mask = self.backbone.grid_tokens(
            waves, lengths, reference=reference, reference_lengths=reference_lengths
        )
        return self.pool(tokens, padding_mask)


def _embed_waves(embedder, waves, lengths, device, prec, batch_size: int, reference=None) -> np.ndarray:
    """Embeddings ``[len(waves), D]`` (per band: ``[len(waves), F, D]``) of 1-D waves whose first
    ``lengths[i]`` samples are audio, ``batch_size`` waves per forward pass; ``reference``: ``(waves, lengths)`` of each wave's noise
    reference (the far channel), for a backbone that takes one."""
    out = []
    for start in range(0, len(waves), batch_size):
        part = waves[start : start + batch_size]
        valid = torch.tensor(lengths[start : start + batch_size])
        padded = data.pad_waves(part)
        extra = {}
        if reference is not None:
            ref_waves, ref_valid = (column[start : start + batch_size] for column in reference)
            extra = {
                "reference": data.pad_waves(ref_waves).to(device, non_blocking=True),
                "reference_lengths": torch.tensor(ref_valid).to(device),
            }
        with prec.autocast():
            emb = embedder(padded.to(device, non_blocking=True), valid.to(device), **extra)
            out.append(emb.float().cpu().numpy())
    return np.concatenate(out)


def _windows(waves, lengths, window: tuple) -> tuple[list, list, np.ndarray]:
    """Cut every wave's audio (its first ``lengths[j]`` samples) into windows: the pieces, their
    audio lengths and the wave each came from."""
    size, hop = (max(1, round(x * data.SAMPLE_RATE)) for x in window)
    pieces, valid, owner = [], [], []
    for j, (wave, n) in enumerate(zip(waves, lengths)):
        for start in window_starts(n, size, hop):
            pieces.append(wave[start : start + size])
            valid.append(min(size, n - int(start)))
            owner.append(j)
    return pieces, valid, np.asarray(owner)


def _reference_windows(reference, lengths, window: tuple) -> tuple[list, list]:
    """The references ``(waves, lengths)`` cut into the windows ``_windows`` cuts their waves into
    (the starts follow the waves' ``lengths``)."""
    size, hop = (max(1, round(x * data.SAMPLE_RATE)) for x in window)
    pieces, valid = [], []
    for wave, n_ref, n in zip(*reference, lengths):
        for start in window_starts(n, size, hop):
            pieces.append(wave[start : start + size])
            valid.append(max(0, min(size, n_ref - int(start))))
    return pieces, valid


def _require_stereo(index: pd.DataFrame, backbone) -> None:
    """A backbone that takes the far channel as its noise reference cannot embed mono clips."""
    mono = index.loc[index["channels"].fillna(2) < 2, "path"]
    if not mono.empty:
        raise data.DatasetError(
            f"{backbone.name} takes the far channel as a noise reference, but {mono.iloc[0]} is mono "
            f"({len(mono)} mono clips in this dataset): it needs stereo near/far clips (the 2026 layout)"
        )


def _warn_if_cut(embedder, longest_seconds: float, window: tuple | None) -> None:
    """A backbone with a fixed input length (EAT's ``target_length``, FISHER's ``pad_to``) drops the end
    of a longer input: say so, since windows of that length would keep it."""
    limit = getattr(getattr(embedder, "backbone", embedder), "max_input_seconds", None)
    seconds = window[0] if window else longest_seconds
    if limit is not None and seconds > limit + 0.05:
        warnings.warn(
            f"the backbone takes at most {limit:.2f} s of input, so the end of inputs up to {seconds:.2f} s "
            f"is dropped; set window_seconds to {limit:.2f} or less to embed whole clips",
            stacklevel=3,
        )


def _batches(index: pd.DataFrame, batch_size: int) -> list[np.ndarray]:
    """Rows sorted by duration, cut into batches: similar lengths share a batch."""
    order = np.argsort(index["duration"].to_numpy(), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class _DecodedBatches(torch.utils.data.Dataset):
    """Item ``b``: the rows of batch ``b`` and, per channel, the clips brought to length and how many
    samples of each are audio. Decoded in loader workers while the model embeds the previous batch;
    each file is read once for all channels. Microphones only: just the window the length policy
    keeps is decoded; with a canceller channel the whole stereo clip is read, cancelled, then cut."""

    def __init__(
        self, paths, batches, channels, length, mask_padding: bool, canceller_settings=None, reference=False
    ):
        self.paths, self.batches, self.channels = list(paths), batches, tuple(channels)
        self.length, self.mask_padding = length, mask_padding
        self.canceller_settings = canceller_settings or {}
        self.reference = reference  # also the far channel, as every channel's noise reference
        self.stereo = reference or any(data.needs_stereo(c) for c in self.channels)
        self.derived = any(c not in data.CHANNEL_INDEX for c in self.channels)
        self.decoded = self.channels + (("far",) if reference and "far" not in self.channels else ())

    def __len__(self) -> int:
        return len(self.batches)

    def _fitted(self, path: str) -> dict[str, tuple[np.ndarray, int]]:
        if self.derived:
            pair = data.load_audio(
                path, "both", canceller=next(c for c in self.channels if c not in data.CHANNEL_INDEX)
            )
            return {
                c: self.length.apply_with_length(data.derive_channel(pair, c, self.canceller_settings))
                for c in self.decoded
            }
        wave, valid = data.read_clip(path, "both" if self.stereo else "near", self.length)
        return {c: ((wave[data.CHANNEL_INDEX[c]] if self.stereo else wave), valid) for c in self.decoded}

    def __getitem__(self, b: int):
        rows = self.batches[b]
        clips = [self._fitted(self.paths[i]) for i in rows]
        decoded = {}
        for channel in self.decoded:
            waves = [clip[channel][0] for clip in clips]
            valid = [clip[channel][1] if self.mask_padding else clip[channel][0].shape[-1] for clip in clips]
            decoded[channel] = (waves, valid)
        reference = decoded["far"] if self.reference else None
        return rows, {c: decoded[c] for c in self.channels}, reference


def collapse_figure(emb: np.ndarray, sample: int = 512, seed: int = 0) -> float:
    """The mean cosine similarity between the embeddings of different clips (on at most ``sample``
    rows): near 1 when every clip maps to about the same direction, so KNN distances cannot rank them."""
    emb = np.asarray(emb, dtype=np.float64)
    emb = emb.reshape(len(emb), -1)  # per-band embeddings [N, F, D]: the clip's whole vector
    if len(emb) > sample:
        emb = emb[np.random.default_rng(seed).choice(len(emb), sample, replace=False)]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norms > 0, norms, 1.0)
    n = len(unit)
    if n < 2:
        return float("nan")
    total = unit.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))  # the mean of the off-diagonal cosines


def check_collapse(items: pd.DataFrame, emb: np.ndarray, name: str) -> dict[str, float]:
    """``{channel: collapse_figure}``, with a warning naming the branch where it exceeds
    ``COLLAPSE_COSINE``; per-band embeddings ``[N, F, D]`` count as one vector per clip."""
    figures = {}
    for channel in dict.fromkeys(items["channel"]):
        rows = (items["channel"] == channel).to_numpy()
        figures[channel] = figure = collapse_figure(emb[rows])
        if figure >= COLLAPSE_COSINE:
            warnings.warn(
                f"{name}: the {channel} embeddings have collapsed (mean cosine similarity {figure:.6f} between "
                "clips): distances cannot rank them. Training diverged or learnt nothing: try a lower lr, "
                "a longer warm-up or fewer steps",
                stacklevel=2,
            )
    return figures


def _as_is(item):
    return item


def _settings(settings: ExtractConfig | None, fields: dict) -> ExtractConfig:
    """``settings`` (default: ``ExtractConfig()``) with ``fields`` (ExtractConfig fields) laid over it:
    every extraction setting is defaulted and checked in ExtractConfig alone."""
    if settings is not None and not isinstance(settings, ExtractConfig):
        raise TypeError(
            f"extraction settings must be a kit.embed.ExtractConfig, got {type(settings).__name__}"
        )
    try:
        return dataclasses.replace(settings or ExtractConfig(), **fields)
    except TypeError as error:  # a field ExtractConfig does not have
        raise ValueError(
            f"unknown extraction setting(s) {sorted(set(fields) - set(ExtractConfig.fields()))}"
        ) from error


@torch.no_grad()
def compute_embeddings(
    embedder: torch.nn.Module,
    index: pd.DataFrame,
    settings: ExtractConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    **fields,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Embed every clip of ``index`` for every channel of ``settings`` (an :class:`ExtractConfig`;
    ``fields`` override single settings, e.g. ``channels=("near",)``). Returns ``(items, emb)``:
    ``items`` holds the index columns plus ``channel``, one row per (clip, channel) in index order,
    channel-major.

    Each clip is first brought to length (``length_mode``/``seconds``; the backbone is told how many
    samples are audio, so added zeros are masked, unless ``mask_padding=False``); with
    ``window_seconds`` the clip's audio is then cut into windows (``window_hop`` apart, default half a
    window, see ``window_starts``) and the clip's embedding is the mean of its windows' embeddings.
    Clips are decoded by ``num_workers`` loader processes (None: ``kit.data.default_workers()``) while
    the model runs, under the ``precision`` policy of ``kit.precision``.

    ``pooling``: ``"head"`` gives the embedder's output ``[N, D]``; ``"band_mean"``/``"band_rdp"`` the
    backbone's grid tokens pooled per band over time (RDP with ``rdp_gamma``), ``[N, F, D]``, the
    windows of a clip averaged per band."""
    from kit import precision as precision_policy

    settings = _settings(settings, fields)
    channels, length, batch_size = settings.channels, settings.length_policy(), settings.batch_size
    if settings.pooling != "head":
        embedder = _GridEmbedder(embedder, settings.pooling, settings.rdp_gamma)
    window = _check_window(settings.window_seconds, settings.window_hop)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prec = precision_policy.resolve(settings.precision, device)
    embedder = embedder.to(device).eval()
    index = index.reset_index(drop=True)
    data.usable_channels(channels, index)  # a channel that needs the far microphone on mono data fails
    backbone = getattr(embedder, "backbone", embedder)
    takes_reference = bool(getattr(backbone, "takes_reference", False))
    if takes_reference:
        _require_stereo(index, backbone)
    longest = float(index["duration"].max()) if length.mode == "none" else float(length.seconds)
    _warn_if_cut(embedder, longest, window)
    batches = _batches(index, batch_size)
    workers = data.default_workers() if settings.num_workers is None else settings.num_workers
    loader = torch.utils.data.DataLoader(
        _DecodedBatches(
            index["path"],
            batches,
            channels,
            length,
            settings.mask_padding,
            settings.canceller_settings,
            takes_reference,
        ),
        batch_size=None,
        num_workers=min(workers, len(batches)),
        collate_fn=_as_is,
        pin_memory=device.type == "cuda",
    )
    out = {channel: None for channel in channels}
    for rows, decoded, reference in tqdm(loader, total=len(batches), desc="embed", disable=not progress):
        for channel, (waves, valid) in decoded.items():
            if window is None:
                emb = _embed_waves(embedder, waves, valid, device, prec, batch_size, reference)
            else:
                pieces, piece_valid, owner = _windows(waves, valid, window)
                cut = None if reference is None else _reference_windows(reference, valid, window)
                per_window = _embed_waves(embedder, pieces, piece_valid, device, prec, batch_size, cut)
                emb = np.zeros((len(waves),) + per_window.shape[1:], dtype=np.float32)
                np.add.at(emb, owner, per_window)
                counts = np.bincount(owner, minlength=len(waves))
                emb /= counts.reshape((-1,) + (1,) * (emb.ndim - 1))  # per band too
            if out[channel] is None:
                out[channel] = np.zeros((len(index),) + emb.shape[1:], dtype=np.float32)
            out[channel][rows] = emb
    for channel, values in out.items():
        if not np.isfinite(values).all():
            bad_rows = ~np.isfinite(values.reshape(len(values), -1)).all(1)
            bad = index["path"].iloc[int(np.flatnonzero(bad_rows)[0])]
            hint = " (fp16 overflow? try precision='fp32')" if prec.mode == "fp16" else ""
            raise FloatingPointError(f"non-finite embedding for {bad} ({channel} channel){hint}")
    parts = [out[channel] for channel in channels]
    tables = [index.assign(channel=channel) for channel in channels]
    return pd.concat(tables, ignore_index=True), np.concatenate(parts)


def extract(
    embedder: torch.nn.Module,
    index: pd.DataFrame,
    run_dir: str | os.PathLike,
    name: str,
    settings: ExtractConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    **fields,
) -> tuple[pd.DataFrame, np.ndarray, Path]:
    """``compute_embeddings`` behind the cache. Returns ``(items, emb, cache_folder)``."""
    settings = _settings(settings, fields)
    window = _check_window(settings.window_seconds, settings.window_hop)
    fingerprint = data_fingerprint(
        index,
        settings.channels,
        settings.length_policy(),
        window,
        settings.mask_padding,
        settings.canceller_settings,
    )
    if settings.precision not in (
        "auto",
        "fp32",
    ):  # a forced low precision gives other numbers: its own cache
        fingerprint += settings.precision
    if settings.pooling != "head":  # only then, so the caches of head embeddings stay valid
        gamma = f"|gamma={float(settings.rdp_gamma)!r}" if settings.pooling == "band_rdp" else ""
        fingerprint += f"|{settings.pooling}" + gamma
    key = hashlib.sha1((model_fingerprint(embedder) + fingerprint).encode())
    folder = Path(run_dir) / "embeddings" / f"{name}-{key.hexdigest()[:12]}"
    if (folder / "emb.npy").exists() and (folder / "items.csv").exists():
        return load(folder) + (folder,)
    items, emb = compute_embeddings(embedder, index, settings, device=device, progress=progress)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        items.to_csv(tmp / "items.csv", index=False)
        np.save(tmp / "emb.npy", emb)
    return items, emb, folder


def load(folder: str | os.PathLike) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a cached ``(items, emb)`` pair."""
    folder = Path(folder)
    for part in ("items.csv", "emb.npy"):
        if not (folder / part).exists():
            raise FileNotFoundError(
                f"{folder / part} not found: not an embedding folder written by kit.embed"
            )
    items = pd.read_csv(
        folder / "items.csv", dtype={"section": str, "attributes": str}, keep_default_na=False
    )
    emb = np.load(folder / "emb.npy")
    if len(items) != len(emb):
        raise ValueError(f"{folder}: items.csv has {len(items)} rows but emb.npy has {len(emb)}")
    return items, emb


def latest(run_dir: str | os.PathLike, name: str) -> Path:
    """The most recently written embedding folder of ``name`` under ``run_dir``."""
    found = sorted((Path(run_dir) / "embeddings").glob(f"{name}-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no embeddings named {name!r} under {Path(run_dir) / 'embeddings'}: run its notebook first"
        )
    return found[-1]


# --------------------------------------------------------------------------------------------------
# A branch: one model's embeddings of every clip, recorded in the run
# --------------------------------------------------------------------------------------------------
BAND_SUFFIXES = {"band_rdp": "_rdp", "band_mean": "_bmean"}  # per-band branch = the model's name + this


def band_branch_name(name: str, pooling: str) -> str:
    """``<name>_rdp`` / ``<name>_bmean``: the branch of model ``name``'s per-band embeddings."""
    if pooling not in BAND_SUFFIXES:
        raise ValueError(
            f"band_pooling {pooling!r}: expected one of {', '.join(BAND_SUFFIXES)} (or None for no per-band branch)"
        )
    return name + BAND_SUFFIXES[pooling]


def embed_branch(
    run_dir: str | os.PathLike,
    index: pd.DataFrame,
    name: str,
    embedder: torch.nn.Module,
    extraction: dict | ExtractConfig,
    *,
    band_pooling: str | list[str] | None = None,
    **entry,
) -> tuple[pd.DataFrame, np.ndarray, Path]:
    """What a branch notebook's last step does: embed every clip of ``index`` with ``embedder`` under the
    ``extraction`` settings (an ``ExtractConfig`` mapping; on mono data its default channels become the
    near channel), cached, and record branch ``name`` in ``run.yaml`` (``entry``: backbone, model_dir,
    training, ...) with its parameter count and collapse figures. ``band_pooling`` (``band_rdp``,
    ``band_mean`` or a list of them) also records the per-band embeddings ``[N, F, D]`` of the same model
    (its backbone's grid tokens before the head, pooled per band over time) as ``<name>_rdp`` /
    ``<name>_bmean``, each with its own folder and settings and the backbone's parameter count (the head
    is not used). Returns the head branch's ``(items, emb, folder)``."""
    settings = (
        extraction if isinstance(extraction, ExtractConfig) else ExtractConfig.for_index(extraction, index)
    )
    poolings = [band_pooling] if isinstance(band_pooling, str) else list(band_pooling or [])
    bands = [band_branch_name(name, pooling) for pooling in poolings]  # a wrong name fails before any work
    items, emb, folder = extract(embedder, index, run_dir, name, settings)
    parameters = int(sum(p.numel() for p in embedder.parameters()))
    manifest.record_branch(
        run_dir,
        name,
        **entry,
        embeddings=folder,
        parameters=parameters,
        extraction=settings.to_dict(),
        collapse=check_collapse(items, emb, name),
    )
    backbone = getattr(embedder, "backbone", embedder)
    for band, pooling in zip(bands, poolings):
        band_settings = dataclasses.replace(settings, pooling=pooling)
        band_items, band_emb, band_folder = extract(embedder, index, run_dir, band, band_settings)
        manifest.record_branch(
            run_dir,
            band,
            **entry,
            embeddings=band_folder,
            parameters=int(sum(p.numel() for p in backbone.parameters())),
            extraction=band_settings.to_dict(),
            collapse=check_collapse(band_items, band_emb, band),
            band_of=name,
        )
    return items, emb, folder
