"""The official DCASE Task 2 autoencoder baseline, as a reference system.

Features: log-mel spectrogram of the NEAR channel (channel 0; a mono clip is its own near channel),
16 kHz, ``n_fft`` 1024, hop 512, 128 mel bands, power 2, ``10 * log10(max(mel, float eps))``, and 5
consecutive frames concatenated into one 640-dim vector (frame t's 128 bands, then frame t+1's, ...),
one vector per frame position. The mel filterbank is librosa's default, which the official baseline
uses: Slaney mel scale with Slaney (area) normalisation (``torchaudio`` ``mel_scale="slaney",
norm="slaney"``), a periodic Hann window, centred frames with zero padding (librosa >= 0.10).

Network: fully connected 640 -> 128 -> 128 -> 128 -> 128 -> 8 -> 128 -> 128 -> 128 -> 128 -> 640,
every layer but the last followed by BatchNorm (momentum 0.01, eps 1e-3, the organisers' values) and
ReLU. One model per machine type, trained on its normal training clips with the mean squared
reconstruction error: Adam, lr 1e-3, batch 256, 100 epochs, 10 % of the clips held out for a
validation loss (held out by clip, so overlapping frames never straddle the split).

Scores (larger = more anomalous), as the organisers compute them:

* ``"MSE"``: the clip's mean squared reconstruction error over all its vectors.
* ``"MAHALA"``: each 640-dim residual ``x - reconstruction`` is cut into its five 128-band frame
  blocks; after training, the covariance of the training residual blocks is fitted per domain
  (source, target; the target falls back to the source when a machine has no target clips). A
  clip's score under one domain is ``m^T C^-1 m`` with ``m`` the mean residual block of the clip
  (the organisers' all-pairs reduction of the residual blocks equals this quadratic form), and the
  MAHALA score is the smaller of the source and target scores.

Audio is streamed clip by clip from disk; training keeps only the log-mel spectrograms of one
machine's training clips in memory (about 160 MB for 1,000 ten-second clips), and stacks the
5-frame vectors of each batch on the fly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
import torch
import torchaudio
from torch import nn
from tqdm.auto import tqdm

from kit import data
from kit.files import atomic_path, write_text_atomic
from kit.scoring import SCORE_COLUMNS

SAMPLE_RATE = 16_000
N_FFT = 1024
HOP_LENGTH = 512
N_MELS = 128
N_FRAMES = 5
INPUT_DIM = N_MELS * N_FRAMES
METHODS = ("MSE", "MAHALA")
CHECKPOINT_FORMAT = "kit.baseline/1"
_INDEX_COLUMNS = ["path", "dataset", "machine", "section", "split", "file_name", "domain", "label"]


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
class LogMel(nn.Module):
    """Waveform [..., T] at 16 kHz -> log-mel power spectrogram in dB [..., 128, frames]."""

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=N_FFT,
            hop_length=HOP_LENGTH,
            n_mels=N_MELS,
            power=2.0,
            mel_scale="slaney",
            norm="slaney",
            center=True,
            pad_mode="constant",
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # The organisers floor the power at float64 machine epsilon before the log (not at 1e-10).
        return 10.0 * torch.log10(torch.clamp(self.mel(wave), min=float(np.finfo(float).eps)))


def stack_frames(log_mel: torch.Tensor, n_frames: int = N_FRAMES) -> torch.Tensor:
    """[n_mels, T] -> [T - n_frames + 1, n_mels * n_frames]: row t = frames t, t+1, ... concatenated."""
    if log_mel.ndim != 2:
        raise ValueError(
            f"stack_frames expects a [n_mels, frames] spectrogram, got shape {tuple(log_mel.shape)}"
        )
    n_mels, total = log_mel.shape
    if total < n_frames:
        raise ValueError(
            f"a spectrogram of {total} frames is shorter than the {n_frames} frames one vector needs"
        )
    windows = log_mel.T.unfold(0, n_frames, 1)  # [T - n_frames + 1, n_mels, n_frames]
    return windows.transpose(1, 2).reshape(-1, n_mels * n_frames)


def _clip_log_mel(path, features: LogMel, channel: str = "near") -> torch.Tensor:
    wave, _ = data.read_clip(path, channel, data.LengthPolicy(), sample_rate=SAMPLE_RATE)
    wave = torch.from_numpy(np.ascontiguousarray(wave))
    log_mel = features(wave)
    if log_mel.shape[1] < N_FRAMES:
        raise ValueError(
            f"{path} is too short: {log_mel.shape[1]} frames, the baseline needs at least {N_FRAMES}"
        )
    return log_mel


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------
def _dense(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3), nn.ReLU()]


class BaselineAutoencoder(nn.Module):
    """640 -> 128x4 -> 8 -> 128x4 -> 640, BatchNorm + ReLU after every layer but the output."""

    def __init__(self, input_dim: int = INPUT_DIM, hidden: int = 128, bottleneck: int = 8, depth: int = 4):
        super().__init__()
        encoder = _dense(input_dim, hidden)
        for _ in range(depth - 1):
            encoder += _dense(hidden, hidden)
        encoder += _dense(hidden, bottleneck)
        decoder = _dense(bottleneck, hidden)
        for _ in range(depth - 1):
            decoder += _dense(hidden, hidden)
        decoder.append(nn.Linear(hidden, input_dim))
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def count_parameters(machines: int = 1) -> int:
    """Parameters of the baseline's autoencoders: one model per machine type."""
    return machines * sum(p.numel() for p in BaselineAutoencoder().parameters())


# --------------------------------------------------------------------------------------------------
# Data selection and checkpoint files
# --------------------------------------------------------------------------------------------------
def model_path(run_dir: str | os.PathLike, machine: str, channel: str = "near") -> Path:
    """Where ``train_baseline`` saves the model of ``machine``: ``<run_dir>/baseline/<machine>.pt`` for
    the near channel (the official baseline), ``<machine>-<channel>.pt`` for another channel."""
    return Path(run_dir) / "baseline" / (f"{machine}.pt" if channel == "near" else f"{machine}-{channel}.pt")


def system_name(method: str, channel: str = "near") -> str:
    """``baseline-MSE`` (the official near-channel baseline), ``baseline-MSE-w1`` on a canceller's output."""
    return f"baseline-{method}" if channel == "near" else f"baseline-{method}-{channel}"


def _machine_clips(index_df: pd.DataFrame, machine: str, splits: tuple[str, ...]) -> pd.DataFrame:
    missing = [c for c in _INDEX_COLUMNS if c not in index_df.columns]
    if missing:
        raise ValueError(f"the index lacks columns {missing}; the baseline needs {_INDEX_COLUMNS}")
    clips = index_df[(index_df["machine"] == machine) & index_df["split"].isin(splits)].reset_index(drop=True)
    if clips.empty:
        known = sorted(index_df["machine"].unique())
        raise ValueError(
            f"no {'/'.join(splits)} clips of machine {machine!r} in the index (machines: {known})"
        )
    if "sample_rate" in clips.columns:
        wrong = clips[clips["sample_rate"] != SAMPLE_RATE]
        if len(wrong):
            raise ValueError(
                f"{wrong['path'].iloc[0]} is sampled at {wrong['sample_rate'].iloc[0]} Hz; the baseline expects "
                f"{SAMPLE_RATE} Hz ({len(wrong)} such clips)"
            )
    return clips


def _resolve_device(device) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def _vector_batch(frames: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The 5-frame vectors beginning at ``starts`` of the concatenated [frames, n_mels] spectrogram."""
    offsets = torch.arange(N_FRAMES, device=frames.device)
    return frames[starts[:, None] + offsets].reshape(len(starts), INPUT_DIM)


class _ResidualMoments:
    """Running count, sum and sum of outer products of 128-band residual blocks, per domain: the
    covariance without holding every training residual in memory."""

    def __init__(self):
        self.count: dict[str, int] = {}
        self.total: dict[str, np.ndarray] = {}
        self.outer: dict[str, np.ndarray] = {}

    def add(self, domain: str, blocks: np.ndarray) -> None:
        blocks = blocks.astype(np.float64)
        self.count[domain] = self.count.get(domain, 0) + len(blocks)
        self.total[domain] = self.total.get(domain, 0.0) + blocks.sum(axis=0)
        self.outer[domain] = self.outer.get(domain, 0.0) + blocks.T @ blocks

    def precisions(self, machine: str) -> dict[str, np.ndarray]:
        """Per domain, the inverse covariance of the blocks (the target falls back to the source)."""
        precisions = {}
        for domain in ("source", "target"):
            n = self.count.get(domain, 0)
            if n == 0:
                continue
            if n <= N_MELS:
                raise ValueError(
                    f"machine {machine}: {n} {domain} residual blocks cannot give a {N_MELS}x{N_MELS} "
                    "covariance; more training audio is needed"
                )
            mean = self.total[domain] / n
            cov = (self.outer[domain] - n * np.outer(mean, mean)) / (n - 1)
            try:
                factor = scipy.linalg.cho_factor(cov, lower=True)
            except np.linalg.LinAlgError as error:
                raise ValueError(
                    f"machine {machine}: the {domain} residual covariance is singular"
                ) from error
            precisions[domain] = scipy.linalg.cho_solve(factor, np.eye(N_MELS))
        if "source" not in precisions:
            raise ValueError(
                f"machine {machine} has no source-domain training clips for the MAHALA covariance"
            )
        precisions.setdefault(
            "target", precisions["source"]
        )  # as the organisers: no target clips, reuse source
        return precisions


def train_baseline(
    index_df: pd.DataFrame,
    run_dir: str | os.PathLike,
    machine: str,
    epochs: int = 100,
    *,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation_split: float = 0.1,
    seed: int = 0,
    channel: str = "near",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Train the baseline autoencoder of one machine type and fit its MAHALA covariances.

    Uses the normal training clips of ``machine`` in ``index_df`` (all its sections, both domains),
    on ``channel`` (the near channel as the organisers do, or a canceller's output such as ``w1``).
    Writes ``model_path(run_dir, machine, channel)`` (weights, covariances, settings, loss history)
    and its ``_history.csv`` beside it, atomically; returns the model path.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must lie in [0, 1), got {validation_split}")
    clips = _machine_clips(index_df, machine, ("train",))
    clips = clips[clips["label"] == "normal"].reset_index(drop=True)
    if clips.empty:
        raise ValueError(f"machine {machine!r} has no normal training clips")
    device = _resolve_device(device)

    frames, clip_starts = _training_frames(clips, channel, device, progress, machine)
    generator = torch.Generator().manual_seed(seed)
    train_starts, validation_starts = _split_by_clip(clip_starts, validation_split, generator, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BaselineAutoencoder().to(device)
    history = _fit(
        model,
        frames,
        train_starts,
        validation_starts,
        epochs,
        batch_size,
        learning_rate,
        generator,
        progress,
        machine,
    )
    precisions = _residual_precisions(model, frames, clip_starts, clips["domain"], machine)

    settings = {
        "sample_rate": SAMPLE_RATE,
        "n_fft": N_FFT,
        "hop_length": HOP_LENGTH,
        "n_mels": N_MELS,
        "n_frames": N_FRAMES,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "validation_split": validation_split,
        "seed": seed,
        "n_clips": len(clips),
        "channel": channel,
    }
    return _save_model(model_path(run_dir, machine, channel), machine, settings, model, precisions, history)


def _training_frames(clips: pd.DataFrame, channel: str, device, progress: bool, machine: str):
    """Every training clip's log-mel frames in one tensor, and per clip the frame positions that
    start a full 5-frame vector."""
    features = LogMel()
    log_mels = [
        _clip_log_mel(path, features, channel).T
        for path in tqdm(clips["path"], desc=f"baseline features {machine}", disable=not progress)
    ]
    lengths = torch.tensor([len(m) for m in log_mels])
    first_frame = torch.cumsum(lengths, 0) - lengths
    frames = torch.cat(log_mels).to(device)
    clip_starts = [first_frame[i] + torch.arange(lengths[i] - N_FRAMES + 1) for i in range(len(clips))]
    return frames, clip_starts


def _split_by_clip(clip_starts, validation_split: float, generator, device):
    """The vector starts of the training clips and of the held-out validation clips (held out by
    clip, so overlapping frames never straddle the split)."""
    order = torch.randperm(len(clip_starts), generator=generator)
    n_validation = int(round(validation_split * len(clip_starts)))
    if validation_split > 0 and len(clip_starts) > 1:
        n_validation = min(max(n_validation, 1), len(clip_starts) - 1)
    validation_clips, training_clips = order[:n_validation], order[n_validation:]
    train_starts = torch.cat([clip_starts[i] for i in training_clips.tolist()]).to(device)
    validation_starts = (
        torch.cat([clip_starts[i] for i in validation_clips.tolist()]).to(device) if n_validation else None
    )
    return train_starts, validation_starts


def _fit(
    model,
    frames,
    train_starts,
    validation_starts,
    epochs,
    batch_size,
    learning_rate,
    generator,
    progress,
    machine,
):
    """Adam on the mean squared reconstruction error, one shuffled pass over the vectors per epoch;
    returns the loss history."""
    device = frames.device
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    history = []
    bar = tqdm(range(epochs), desc=f"baseline train {machine}", disable=not progress)
    for epoch in bar:
        model.train()
        permutation = torch.randperm(len(train_starts), generator=generator).to(device)
        total, count = torch.zeros((), device=device), 0
        for batch in permutation.split(batch_size):
            if len(batch) < 2:  # BatchNorm cannot normalise a single vector
                continue
            x = _vector_batch(frames, train_starts[batch])
            loss = nn.functional.mse_loss(model(x), x)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.detach() * len(batch)  # summed on the device: no host sync per step
            count += len(batch)
        record = {"epoch": epoch + 1, "train_loss": float(total) / max(count, 1)}
        if validation_starts is not None:
            record["val_loss"] = _mean_reconstruction_error(model, frames, validation_starts, batch_size)
        history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"})
    return history


@torch.no_grad()
def _residual_precisions(model, frames, clip_starts, domains, machine: str) -> dict[str, np.ndarray]:
    """MAHALA's precision matrices from the residuals of every training clip, by domain."""
    model.eval()
    moments = _ResidualMoments()
    for i, domain in enumerate(domains):
        x = _vector_batch(frames, clip_starts[i].to(frames.device))
        moments.add(domain, (x - model(x)).reshape(-1, N_MELS).cpu().numpy())
    return moments.precisions(machine)


def _save_model(path: Path, machine: str, settings: dict, model, precisions: dict, history: list) -> Path:
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "machine": machine,
        "settings": settings,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "precision": {domain: torch.from_numpy(p) for domain, p in precisions.items()},
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    write_text_atomic(path.with_name(f"{path.stem}_history.csv"), pd.DataFrame(history).to_csv(index=False))
    return path


@torch.no_grad()
def _mean_reconstruction_error(
    model: nn.Module, frames: torch.Tensor, starts: torch.Tensor, batch_size: int
) -> float:
    model.eval()
    total = 0.0
    for batch in starts.split(batch_size):
        x = _vector_batch(frames, batch)
        total += float(((model(x) - x) ** 2).mean(dim=1).sum())
    return total / len(starts)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def load_baseline(path: str | os.PathLike, device: str | torch.device | None = None):
    """``(model in eval mode, {"source": precision, "target": precision}, checkpoint dict)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline model {path} not found: train it with train_baseline first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        from kit.backbones.loading import describe_load_error  # torch's weights_only advice left out

        raise ValueError(
            f"{path} is not a readable baseline checkpoint: {describe_load_error(error)}"
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint written by train_baseline")
    model = BaselineAutoencoder()
    model.load_state_dict(checkpoint["state_dict"])
    model.to(_resolve_device(device)).eval()
    precisions = {domain: p.numpy() for domain, p in checkpoint["precision"].items()}
    return model, precisions, checkpoint


def mahala_scores(mean_residuals, precisions: dict[str, np.ndarray]) -> np.ndarray:
    """MAHALA scores from clips' mean residual blocks [N, 128]: ``min`` over domains of ``m^T P m``."""
    mean_residuals = np.asarray(mean_residuals, dtype=np.float64)
    per_domain = [
        np.einsum("ni,ij,nj->n", mean_residuals, precisions[d], mean_residuals) for d in ("source", "target")
    ]
    return np.minimum(*per_domain)


def score_baseline(
    index_df: pd.DataFrame,
    run_dir: str | os.PathLike,
    machine: str,
    method: str = "MAHALA",
    *,
    include_train: bool = True,
    channel: str = "near",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Score the clips of ``machine`` with its trained baseline: a scores DataFrame (``SCORE_COLUMNS``).

    ``method`` is ``"MSE"`` or ``"MAHALA"`` (see the module docstring). Test clips are always scored,
    training clips too when ``include_train`` (the autoencoder has seen them: their scores serve
    the official decision threshold, as in the organisers' baseline). ``channel`` as in training.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    clips, scores = _score_clips(index_df, run_dir, machine, include_train, channel, device, progress)
    return clips.assign(channel=channel, score=scores[method])[SCORE_COLUMNS]


def _score_clips(
    index_df, run_dir, machine, include_train, channel, device, progress
) -> tuple[pd.DataFrame, dict]:
    """Both methods' scores from one decoding and reconstruction of each clip."""
    model, precisions, _ = load_baseline(model_path(run_dir, machine, channel), device)
    clips = _machine_clips(index_df, machine, ("train", "test") if include_train else ("test",))
    device = next(model.parameters()).device
    features = LogMel()
    errors, mean_residuals = [], []
    with torch.no_grad():
        for path in tqdm(clips["path"], desc=f"baseline score {machine}", disable=not progress):
            x = stack_frames(_clip_log_mel(path, features, channel)).to(device)
            residual = x - model(x)
            errors.append(float((residual**2).mean()))
            mean_residuals.append(residual.reshape(-1, N_MELS).mean(dim=0).cpu().numpy())
    return clips, {"MSE": np.array(errors), "MAHALA": mahala_scores(np.stack(mean_residuals), precisions)}


def run_baseline(
    index_df: pd.DataFrame,
    run_dir: str | os.PathLike,
    *,
    epochs: int = 100,
    methods: tuple[str, ...] = ("MSE", "MAHALA"),
    channels: tuple[str, ...] = ("near",),
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Train one autoencoder per machine type and channel (reusing a saved model trained with the same
    epochs and seed) and score every clip with each method (one decoding per clip for all methods):
    ``{system_name(method, channel): scores}`` (``baseline-MSE``, ``baseline-MAHALA``,
    ``baseline-MSE-w1``, ...) in the scores contract."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown baseline method(s) {unknown}; expected a subset of {METHODS}")
    per_system: dict[str, list[pd.DataFrame]] = {}
    for channel in channels:
        data.check_channel(channel)
        for machine in sorted(index_df["machine"].unique()):
            path = model_path(run_dir, machine, channel)
            saved = load_baseline(path)[2]["settings"] if path.exists() else {}
            if (saved.get("epochs"), saved.get("seed")) != (epochs, seed):
                train_baseline(
                    index_df,
                    run_dir,
                    machine,
                    epochs=epochs,
                    seed=seed,
                    channel=channel,
                    device=device,
                    progress=progress,
                )
            clips, scores = _score_clips(index_df, run_dir, machine, True, channel, device, progress)
            for method in methods:
                frame = clips.assign(channel=channel, score=scores[method])[SCORE_COLUMNS]
                per_system.setdefault(system_name(method, channel), []).append(frame)
    return {name: pd.concat(parts, ignore_index=True) for name, parts in per_system.items()}
