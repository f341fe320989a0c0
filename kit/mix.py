"""Semi-real 2026-style stereo clips from real mono recordings and real noise recordings.

``python -m kit.mix MONO_ROOT NOISE_DIR OUT_ROOT [--seed S]`` (or :func:`mix_dataset`) reads a mono
dataset in the official layout (``<root>/{dev,eval}_data/raw/<machine>/{train,test}/*.wav`` with its
``attributes_XX.csv`` tables, e.g. DCASE 2020-2025 data) and a folder of noise recordings (every
``*.wav`` below it; other files are ignored) and writes the same clips, under the same names and with
the same attribute tables, as stereo 16-bit 16 kHz WAVs: channel 0 = near, channel 1 = far.

Model of one clip (levels are RMS over the clip; each clip draws its values uniformly from the ranges,
defaults in brackets, all settable):

- near = the recorded clip ``x`` as it is + noise at a machine-to-noise ratio ``near_snr_db`` [0, 10];
- far = ``x`` through a synthetic reverberant room (``far_rt60_s`` [0.4, 0.8]), at ``far_machine_db``
  [-12, -6] relative to ``x``, + noise ``far_noise_gain_db`` [6, 12] louder than at the near microphone;
- the noise: one realisation of the noise sources (segments of randomly chosen noise recordings at
  random offsets, joined with 10 ms cross-fades) heard by each microphone through its own path, a
  direct sound after a delay, a few early reflections and a short reverberant tail (``noise_rt60_s``
  [0.1, 0.25]); the far microphone is nearer the sources, the near one hears them ``noise_delay_s``
  [0.001, 0.01] later; plus a part independent per microphone (segments of other recordings where the
  folder has them, ``independent_db`` [-18, -12] relative to the coherent part), so the far channel is a
  good but imperfect noise reference.

Where a mixture would clip, both channels are scaled down together (``output_gain`` < 1 in the clip
table). Clips and noise recordings at other sample rates are resampled to 16 kHz (polyphase); noise
recordings with several channels are averaged to mono. Every clip draws from its own RNG, seeded by
(seed, its relative path), so the output does not depend on the order of the work; each file is written
atomically and a finished file is skipped, so an interrupted run resumes. Also written:
``mix_dataset.json`` (the parameters; a second call with the same ones returns at once, other ones are
refused) and ``mix_clips.csv`` (per clip: the drawn levels, the noise segments used, the output gain).
The paths and rooms are drawn as ``kit.synth`` draws them, with the same defaults. ``kit.tools.synth_check``
reads the record to score the ``clean`` channel (the mono clip times its output gain) beside the near,
far and cancelled channels.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import json
import math
import os
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import soundfile as sf
from tqdm.auto import tqdm

from kit import synth
from kit.files import atomic_path, read_dataset_record, start_dataset, write_text_atomic

SAMPLE_RATE = 16_000
MIXER_VERSION = 1
RECORD_NAME = "mix_dataset.json"
LEGACY_RECORD_NAME = "mix_manifest.json"  # its name before kit 2026-12
CLIPS_CSV_NAME = "mix_clips.csv"
DATASETS = ("dev", "eval")
_FOLDERS = [f"{dataset}_data" for dataset in DATASETS]  # what a dataset root holds
CROSSFADE_S = 0.01
WARM_UP_S = 0.5  # noise rendered before the clip starts, so the paths' reverberation is in steady state
PEAK_LIMIT = 0.99


@dataclass(frozen=True)
class MixSettings:
    """Ranges (low, high) that each clip draws its levels and paths from (see the module docstring)."""

    near_snr_db: tuple[float, float] = (0.0, 10.0)
    far_machine_db: tuple[float, float] = (-12.0, -6.0)
    far_noise_gain_db: tuple[float, float] = (6.0, 12.0)
    far_rt60_s: tuple[float, float] = (0.4, 0.8)
    noise_delay_s: tuple[float, float] = (0.001, 0.01)
    noise_rt60_s: tuple[float, float] = (0.1, 0.25)
    independent_db: tuple[float, float] = (-18.0, -12.0)

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            low, high = (float(v) for v in value)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(f"{name} must be a finite range (low, high) with low <= high, got {value!r}")
            if name.endswith("_s") and low < 0:
                raise ValueError(f"{name} is a time in seconds and must not be negative, got {value!r}")
            object.__setattr__(self, name, (low, high))
        if self.far_rt60_s[0] <= 0 or self.noise_rt60_s[0] <= 0:
            raise ValueError("reverberation times must be positive")


@dataclass(frozen=True)
class NoiseFile:
    path: Path
    relative: str  # below the noise folder, the name the clip table gives
    frames: int  # at its own sample rate
    sample_rate: int

    @property
    def frames_16k(self) -> int:
        return int(self.frames * SAMPLE_RATE // self.sample_rate)


@dataclass(frozen=True)
class MonoClip:
    path: Path
    relative: str  # below the mono root (and below the output root)
    frames: int
    sample_rate: int


@dataclass(frozen=True)
class ClipMix:
    """Everything drawn for one clip before any audio is read: levels, paths, noise segments."""

    relative: str
    near_snr_db: float
    far_machine_db: float
    far_noise_gain_db: float
    far_rt60_s: float
    noise_delay_s: float
    noise_rt60_s: float
    independent_db: tuple[float, float]
    segments: tuple[tuple[tuple[int, int, int], ...], ...]  # (shared, near, far): (file, start, frames)
    path_seed: int  # for the impulse responses


# ---------------------------------------------------------------- inputs


def find_mono_clips(mono_root: str | os.PathLike) -> list[MonoClip]:
    """Every clip of ``mono_root`` in the official layout, checked to be a readable mono WAV."""
    root = Path(mono_root)
    if not root.is_dir():
        raise FileNotFoundError(f"mono dataset root {root} is not a folder")
    raws = [
        root / f"{dataset}_data" / "raw" for dataset in DATASETS if (root / f"{dataset}_data/raw").is_dir()
    ]
    if not raws:
        raise FileNotFoundError(
            f"no dev_data/raw or eval_data/raw under {root} (expected <root>/dev_data/raw/<machine>/"
            "{train,test}/*.wav)"
        )
    clips = []
    for raw in raws:
        for path in sorted(raw.glob("*/*/*.wav")):
            if path.parent.name not in ("train", "test"):
                continue
            info = _wav_info(path, "clip")
            if info.channels != 1:
                raise ValueError(
                    f"{path}: {info.channels} channels, expected a mono clip (the mono root must hold "
                    "single-microphone recordings; this one looks stereo already)"
                )
            clips.append(MonoClip(path, path.relative_to(root).as_posix(), info.frames, info.samplerate))
    if not clips:
        raise FileNotFoundError(f"no WAV clips under {', '.join(map(str, raws))}/<machine>/{{train,test}}")
    return clips


def find_noise_files(noise_dir: str | os.PathLike) -> list[NoiseFile]:
    """Every ``*.wav`` below ``noise_dir`` (recursively, sorted), each checked to be a readable WAV."""
    folder = Path(noise_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"noise folder {folder} is not a folder")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".wav"):
        info = _wav_info(path, "noise recording")
        if info.frames < info.samplerate // 10:
            raise ValueError(f"{path}: noise recording of {info.frames} frames, expected at least 0.1 s")
        files.append(NoiseFile(path, path.relative_to(folder).as_posix(), info.frames, info.samplerate))
    if not files:
        raise FileNotFoundError(f"no WAV files below the noise folder {folder}")
    return files


def _wav_info(path: Path, what: str):
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable WAV {what} ({error})") from error
    if info.format != "WAV" or info.frames == 0:
        raise ValueError(f"{path}: not a WAV {what} with audio (format {info.format}, {info.frames} frames)")
    return info


def _read_mono(path: Path, start: int = 0, frames: int = -1, what: str = "clip") -> tuple[np.ndarray, int]:
    try:
        audio, rate = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read this {what} ({error})") from error
    return audio.mean(axis=1), rate


def _resampled(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return audio
    divisor = math.gcd(SAMPLE_RATE, rate)
    return scipy.signal.resample_poly(audio, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)


def read_clip(clip_path: str | os.PathLike) -> np.ndarray:
    """A mono clip as float32 at 16 kHz (resampled when recorded at another rate)."""
    audio, rate = _read_mono(Path(clip_path))
    return _resampled(audio, rate)


# ---------------------------------------------------------------- planning and mixing


def _clip_rng(seed: int, relative: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(relative.encode()), MIXER_VERSION])


def _segments(
    rng: np.random.Generator, noise: Sequence[NoiseFile], length: int, avoid: frozenset[int] = frozenset()
) -> tuple[tuple[int, int, int], ...]:
    """Random (file, start, frames) pieces, in 16-kHz frames, that cover ``length`` with cross-fades,
    from files other than ``avoid`` where there are any (an independent part must not share a file)."""
    fade = int(CROSSFADE_S * SAMPLE_RATE)
    choices = [i for i in range(len(noise)) if i not in avoid] or list(range(len(noise)))
    pieces, covered = [], 0
    while covered < length:
        index = choices[int(rng.integers(len(choices)))]
        available = noise[index].frames_16k
        frames = min(available, length - covered + (fade if pieces else 0))
        frames = max(frames, min(available, 2 * fade + 1))
        start = int(rng.integers(available - frames + 1))
        pieces.append((index, start, frames))
        covered += frames - (fade if len(pieces) > 1 else 0)
    return tuple(pieces)


def plan_clip(clip: MonoClip, noise: Sequence[NoiseFile], settings: MixSettings, seed: int) -> ClipMix:
    """Draw one clip's levels, paths and noise segments (deterministic given the seed and its path)."""
    rng = _clip_rng(seed, clip.relative)
    ranges = dataclasses.asdict(settings)
    independent_range = ranges.pop("independent_db")
    independent = tuple(float(rng.uniform(*independent_range)) for _ in range(2))
    draw = {name: float(rng.uniform(*value)) for name, value in ranges.items()}
    n = int(clip.frames * SAMPLE_RATE // clip.sample_rate)
    shared = _segments(rng, noise, n + int(WARM_UP_S * SAMPLE_RATE))  # heard by both microphones
    used = frozenset(piece[0] for piece in shared)
    near_own = _segments(rng, noise, n, used)  # each microphone's own part, from other recordings
    far_own = _segments(rng, noise, n, used | {piece[0] for piece in near_own})
    segments = (shared, near_own, far_own)
    return ClipMix(
        relative=clip.relative,
        independent_db=independent,
        segments=segments,
        path_seed=int(rng.integers(2**31)),
        **draw,
    )


def _noise_signal(
    pieces: Sequence[tuple[int, int, int]], noise: Sequence[NoiseFile], length: int
) -> np.ndarray:
    """The pieces read, resampled, joined with raised-cosine cross-fades and cut to ``length``."""
    fade = int(CROSSFADE_S * SAMPLE_RATE)
    ramp = np.sin(0.5 * np.pi * (np.arange(fade) + 0.5) / fade).astype(np.float32) ** 2
    out = np.zeros(length + sum(p[2] for p in pieces), dtype=np.float32)
    position = 0
    for k, (index, start, frames) in enumerate(pieces):
        file = noise[index]
        ratio = file.sample_rate / SAMPLE_RATE  # read the matching stretch at the file's own rate
        audio, rate = _read_mono(
            file.path, int(start * ratio), int(math.ceil(frames * ratio)) + 1, "noise recording"
        )
        piece = _resampled(audio, rate)[:frames]
        piece = np.pad(piece, (0, frames - len(piece)))
        piece = _unit_rms(piece)  # recordings of different loudness weigh alike
        if k > 0:
            piece[:fade] *= ramp
            position -= fade
        if k < len(pieces) - 1:
            piece[-fade:] *= ramp[::-1]
        out[position : position + frames] += piece
        position += frames
    return out[:length]


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-12)


def _rms(x: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-12)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return scipy.signal.fftconvolve(x, kernel)[: len(x)].astype(np.float32)


def render(machine: np.ndarray, plan: ClipMix, noise: Sequence[NoiseFile]) -> tuple[np.ndarray, float]:
    """The stereo clip ``[T, 2]`` (near, far) of one mono clip ``machine`` and its output gain."""
    n = len(machine)
    warm_up = int(WARM_UP_S * SAMPLE_RATE)
    rng = np.random.default_rng(plan.path_seed)
    shared = _noise_signal(plan.segments[0], noise, n + warm_up)
    far_delay = float(rng.uniform(0.001, 0.004))
    coherent = [
        _convolve(shared, synth.noise_path(rng, delay, plan.noise_rt60_s * rng.uniform(0.85, 1.15)))[warm_up:]
        for delay in (far_delay + plan.noise_delay_s, far_delay)
    ]
    channels_noise = []
    for part, pieces, independent_db in zip(coherent, plan.segments[1:], plan.independent_db):
        own = _noise_signal(pieces, noise, n)
        channels_noise.append(_unit_rms(part) + 10.0 ** (independent_db / 20.0) * _unit_rms(own))
    near_noise, far_noise = channels_noise
    near_noise = near_noise / _rms(near_noise) * _rms(machine) * 10.0 ** (-plan.near_snr_db / 20.0)
    far_noise = far_noise / _rms(far_noise) * _rms(near_noise) * 10.0 ** (plan.far_noise_gain_db / 20.0)
    reverberant = _convolve(machine, synth.room_response(rng, plan.far_rt60_s))
    far_machine = reverberant / _rms(reverberant) * _rms(machine) * 10.0 ** (plan.far_machine_db / 20.0)
    stereo = np.stack([machine + near_noise, far_machine + far_noise], axis=1)
    peak = float(np.abs(stereo).max())
    gain = min(1.0, PEAK_LIMIT / peak) if peak > 0 else 1.0
    return (stereo * gain).astype(np.float32), gain


# ---------------------------------------------------------------- the dataset


def _parameters(
    mono_root: Path, noise_dir: Path, noise: Sequence[NoiseFile], settings: MixSettings, seed: int
) -> dict:
    return {
        "mixer_version": MIXER_VERSION,
        "seed": seed,
        "mono_root": str(mono_root.resolve()),
        "noise_dir": str(noise_dir.resolve()),
        "noise_files": [[f.relative, f.frames, f.sample_rate] for f in noise],
        "settings": {name: list(value) for name, value in dataclasses.asdict(settings).items()},
    }


def _table_row(plan: ClipMix, gain: float, noise: Sequence[NoiseFile]) -> list:
    def pieces(segments):
        return ";".join(f"{noise[i].relative}@{start}+{frames}" for i, start, frames in segments)

    return [
        plan.relative,
        f"{plan.near_snr_db:.2f}",
        f"{plan.far_machine_db:.2f}",
        f"{plan.far_noise_gain_db:.2f}",
        f"{plan.far_rt60_s:.3f}",
        f"{plan.noise_delay_s:.4f}",
        f"{plan.noise_rt60_s:.3f}",
        f"{plan.independent_db[0]:.2f}",
        f"{plan.independent_db[1]:.2f}",
        f"{gain:.6f}",
        pieces(plan.segments[0]),
        pieces(plan.segments[1]),
        pieces(plan.segments[2]),
    ]


TABLE_HEADER = [
    "path",
    "near_snr_db",
    "far_machine_db",
    "far_noise_gain_db",
    "far_rt60_s",
    "noise_delay_s",
    "noise_rt60_s",
    "independent_near_db",
    "independent_far_db",
    "output_gain",
    "shared_noise",
    "near_own_noise",
    "far_own_noise",
]


def mix_dataset(
    mono_root: str | os.PathLike,
    noise_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    seed: int = 0,
    settings: MixSettings | None = None,
    progress: bool = True,
) -> dict:
    """Write the stereo dataset under ``out_root`` and return its record (see the module docstring)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    settings = MixSettings() if settings is None else settings
    mono_root, noise_dir, out_root = Path(mono_root), Path(noise_dir), Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise NotADirectoryError(f"output root {out_root} is a file; expected a folder")
    if out_root.resolve() == mono_root.resolve():
        raise ValueError(f"the output root {out_root} is the mono root: choose another folder")
    clips = find_mono_clips(mono_root)
    noise = find_noise_files(noise_dir)
    parameters = _parameters(mono_root, noise_dir, noise, settings, int(seed))
    finished = start_dataset(out_root, RECORD_NAME, "kit.mix", _FOLDERS, parameters, LEGACY_RECORD_NAME)
    if finished is not None:
        return finished

    rows = []
    for clip in tqdm(clips, desc="mixing stereo clips", unit="clip", disable=not progress):
        plan = plan_clip(clip, noise, settings, int(seed))
        target = out_root / clip.relative
        machine = read_clip(clip.path)
        if target.exists():  # written atomically by an earlier run: complete; only its gain is needed
            _, gain = render(machine, plan, noise)
        else:
            stereo, gain = render(machine, plan, noise)
            pcm = np.round(np.clip(stereo, -1.0, 32767 / 32768) * 32768).astype(np.int16)
            with atomic_path(target) as tmp:
                sf.write(tmp, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        rows.append(_table_row(plan, gain, noise))
    for table in sorted({p for c in clips for p in c.path.parent.parent.glob("attributes_*.csv")}):
        write_text_atomic(out_root / table.relative_to(mono_root), table.read_text(encoding="utf-8"))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_HEADER)
    writer.writerows(rows)
    write_text_atomic(out_root / CLIPS_CSV_NAME, buffer.getvalue())
    summary = {**parameters, "complete": True, "clips": len(clips)}
    write_text_atomic(out_root / RECORD_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


@functools.lru_cache(maxsize=4)
def _output_gains(out_root: str, mtime_ns: int) -> dict[str, float]:
    with open(Path(out_root) / CLIPS_CSV_NAME, newline="", encoding="utf-8") as handle:
        return {row["path"]: float(row["output_gain"]) for row in csv.DictReader(handle)}


def clean_near(out_root: str | os.PathLike, clip_path: str | os.PathLike) -> np.ndarray:
    """The machine part of a kit.mix clip's near channel: its mono source clip times its output gain."""
    out_root = Path(out_root)
    record = read_dataset_record(out_root, RECORD_NAME, "kit.mix", _FOLDERS, LEGACY_RECORD_NAME)
    if record is None or not record.get("complete"):
        raise ValueError(f"{out_root} is not a finished kit.mix dataset (no complete {RECORD_NAME})")
    table = out_root / CLIPS_CSV_NAME
    relative = Path(clip_path).resolve().relative_to(out_root.resolve()).as_posix()
    gains = _output_gains(str(out_root.resolve()), table.stat().st_mtime_ns)
    if relative not in gains:
        raise ValueError(f"{clip_path}: not a clip of the kit.mix dataset at {out_root}")
    source = Path(record["mono_root"]) / relative
    if not source.exists():
        raise FileNotFoundError(f"{source}: the mono clip {clip_path} was mixed from is gone")
    machine = read_clip(source) * np.float32(gains[relative])
    return (np.round(np.clip(machine, -1.0, 32767 / 32768) * 32768) / 32768).astype(np.float32)


def _range(text: str) -> tuple[float, float]:
    return tuple(float(v) for v in text.split(","))


def main(argv: list[str] | None = None, prog: str = "python -m kit.mix") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("mono_root", help="mono dataset root: <root>/{dev,eval}_data/raw/<machine>/...")
    parser.add_argument("noise_dir", help="folder of noise recordings (every *.wav below it)")
    parser.add_argument("out_root", help="folder to write the stereo dataset into (empty or a kit.mix one)")
    parser.add_argument("--seed", type=int, default=0)
    defaults = MixSettings()
    for field in dataclasses.fields(MixSettings):
        low, high = getattr(defaults, field.name)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=_range,
            default=(low, high),
            metavar="LOW,HIGH",
            help=f"range each clip draws {field.name} from (default {low:g},{high:g})",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    settings = MixSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MixSettings)})
    summary = mix_dataset(
        args.mono_root,
        args.noise_dir,
        args.out_root,
        seed=args.seed,
        settings=settings,
        progress=not args.quiet,
    )
    print(f"{summary['clips']} stereo clips in {args.out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
