"""Embedded DCASE-2026-style dataset: deterministic synthetic machine sounds with a real detection problem.

``generate(root)`` (or ``python -m kit.synth ROOT``) writes a small dataset in the official layout:
``dev_data/raw/<machine>/{train,test}`` with ``attributes_00.csv``, ``eval_data/raw/<machine>/{train,test}``
with hidden test names (``section_00_0000.wav`` ...), and the evaluation ground truth in the organisers'
evaluator layout (``eval_ground_truth/ground_truth_{data,domain,attributes}/``), so every stage of the
toolkit runs end to end without downloads.

Generative model
----------------
Machines (section 00; clip length fixed per machine type, as in the real data):

- dev ``SynMotor`` (10 s), rotating harmonic machine: harmonic series on a slowly wandering fundamental,
  lifted by two housing resonances and a rotor-slot tone (order 36), amplitude-modulated at a few Hz,
  plus brush noise. Attributes ``spd`` (the fundamental, 40 to 86 Hz) and ``load`` (spectral tilt,
  modulation depth and rate).
- dev ``SynValve`` (6 s), impulsive periodic machine: opening and closing clicks (damped resonant modes),
  flow hiss while open, weak solenoid hum. Attribute ``pat`` (rhythm: rate and stroke pattern).
- dev ``SynFan`` (16 s), broadband flow machine: turbulent shaped noise with blade-pass tones (7 blades).
  No attributes (``noAttribute``); a hidden rotation speed still differs between the domains.
- eval ``SynGearbox`` (10 s), harmonic variant: gear-mesh tones (23 teeth) with rotation sidebands;
  attribute ``spd``.
- eval ``SynBlower`` (6 s), flow variant: darker spectrum, 11 blades; no attributes, hidden speed.

Domains: the target domain uses attribute values (or hidden speeds) never seen in the source domain,
another background (source: babble and mains hum dominate; target: traffic rumble and factory clanks)
and another room for the far microphone (RT60 0.4 s vs 0.65 s). Every clip also draws nuisance
variation: speed (+-1.5 %), level (+-0.7 dB), tilt, modulation, click modes, noise mix and level.

Channels (stereo, 16 kHz, 16-bit; channel 0 = near, channel 1 = far), as in the 2026 data, where noise
matters on the near microphone and the far one is a noise reference that also hears the machine:

- Noise: one realisation of the environment (babble-like, mains hum, traffic-like rumble, factory
  clanks) reaches each microphone through its own path, a direct sound after a delay, four early
  reflections and a short reverberant tail (RT60 0.1 to 0.25 s), drawn per clip and per microphone;
  the far microphone is nearer the sources, the near one hears them 1 to 10 ms later. Each microphone
  adds its own diffuse noise, 12 to 18 dB below its coherent noise, so the far channel is a good but
  imperfect reference (near and far noise are not one signal up to a gain).
- Near = machine + noise at a machine-to-noise ratio drawn per clip from the machine type's range:
  SynMotor and SynGearbox 0 to 5 dB, SynValve 4 to 9 dB, SynBlower 4 to 10 dB, SynFan 8 to 14 dB.
- Far = the machine through a synthetic reverberant room (RT60 0.4 s source domain, 0.65 s target),
  at a level against the near machine that differs between machine types (the leakage): SynValve
  -3 to -1 dB (the far microphone holds much of the machine, a whole-clip canceller removes machine
  sound), SynGearbox -8 to -4, SynFan -10 to -6, SynBlower -18 to -12, SynMotor -20 to -15 dB; plus the
  noise, 6 to 12 dB louder than at the near microphone.
- The machine signal alone is known: ``render_clip(plan, seed)`` re-renders any clip with its machine
  part per channel (``kit.synth_check`` scores this ``clean`` channel; nothing extra is written).

Anomalies (test clips only; one kind per clip, with a severity drawn uniformly in [0.05, 1] that scales
its level in dB or its extent linearly, so the mildest are inaudible): harmonic: bearing-fault impulses,
added half-order harmonics, extra amplitude modulation, rubbing (band-limited noise bursts); impulsive:
leak whistle while closed, seat bounce, lower and longer closing resonance, irregular and skipped
strokes; flow: imbalance (1x tone and modulation), blade damage (per-revolution harmonics), bearing
impulses, clogging (steeper spectrum), rubbing.

Sizes at ``scale=1.0``: per machine 40 source + 10 target training clips (the source count scales, the
10 target clips do not) and a balanced test set of 10 clips per (source|target) x (normal|anomaly)
cell (scaled): 450 clips, 72 min of audio, 276 MB. Every clip comes from its own RNG seeded by (seed,
machine, split, domain, label, index), so the files do not depend on the order or the number of worker
processes. Also written: ``synth_clips.csv`` (each clip's domain, attributes, anomaly kind and
severity) and ``synth_manifest.json`` (the parameters; a second call with the same ones returns at once).
Calibration (``python -m kit.synth_check ROOT``): a log-mel-statistics 1-NN detector scores an official
hmean of 0.59 to 0.70 on the near channel (seeds 0 to 2), 0.79 to 0.84 on the clean machine signal and
0.50 to 0.55 on the far channel, lower in the target domain than in the source; the cancellers of
``kit.denoise`` close part of the gap between near and clean (the leakage-aware ``wl`` most: 0.70 to
0.72), the whole-clip gain ``w1`` least where the far microphone hears the machine strongly.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import itertools
import json
import multiprocessing
import os
import sys
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.signal
import soundfile as sf
from tqdm.auto import tqdm

from kit.files import atomic_path, write_text_atomic

SAMPLE_RATE = 16_000
GENERATOR_VERSION = 2
LAYOUTS = ("2026", "mono")
SOURCE_TRAIN_CLIPS = 40  # at scale 1.0
TARGET_TRAIN_CLIPS = 10  # per section, never scaled (as in the real data)
TEST_CLIPS_PER_CELL = 10  # per (domain, label) cell at scale 1.0
MANIFEST_NAME = "synth_manifest.json"
CLIPS_CSV_NAME = "synth_clips.csv"
OUTPUT_GAIN = 0.015  # RMS of the near-channel machine sound: -36.5 dBFS (real recordings: about -40)
SEVERITY_RANGE = (0.05, 1.0)

SPLITS = ("train", "test")
DOMAINS = ("source", "target")
LABELS = ("normal", "anomaly")
ROOM_RT60 = {"source": 0.4, "target": 0.65}  # the far microphone's room, per domain (seconds)
NOISE_KINDS = ("babble", "hum", "traffic", "clank")
NOISE_PATH_DELAY_S = (0.001, 0.01)  # the near microphone hears the noise this much later than the far one
NOISE_PATH_RT60_S = (0.1, 0.25)  # reverberation of the noise paths (one room, one tail per microphone)
INDEPENDENT_NOISE_DB = (-18.0, -12.0)  # the diffuse noise of each microphone vs its coherent noise
FAR_NOISE_GAIN_DB = (6.0, 12.0)  # noise at the far microphone vs the near one
NOISE_TAIL_GAIN = 0.3  # RMS of the reverberant tail of a noise path against its direct sound
BACKGROUND_WEIGHTS = {
    "source": {"babble": 1.0, "hum": 0.7, "traffic": 0.4, "clank": 0.3},
    "target": {"babble": 0.4, "hum": 0.3, "traffic": 1.0, "clank": 0.6},
}


@dataclass(frozen=True)
class Attribute:
    """One domain-shifting factor: its label values per domain, mapped to a synthesis parameter.

    A hidden attribute changes the sound but is not written in file names (``noAttribute`` machines).
    """

    key: str
    parameter: str
    source: dict[str, float]
    target: dict[str, float]
    hidden: bool = False


@dataclass(frozen=True)
class MachineSpec:
    """A synthetic machine type: its character (synthesis function), clip length, attributes, faults."""

    name: str
    dataset: str
    character: str
    duration_s: int
    attributes: tuple[Attribute, ...]
    anomalies: tuple[str, ...]
    params: dict[str, float] = field(default_factory=dict)
    anomaly_levels: dict[str, tuple[float, float]] = field(default_factory=dict)
    near_snr_db: tuple[float, float] = (6.0, 12.0)  # machine-to-noise at the near microphone, per clip
    far_machine_db: tuple[float, float] = (-8.0, -5.0)  # the machine's level at the far mic vs the near


# Anomaly levels are (dB at the lowest severity, dB at full severity) relative to the unit-RMS machine
# sound, except "modulation"/"timing"/"resonance"/"clogging", whose pair spans a modulation depth, a
# jitter fraction, a frequency factor or a tilt in dB.
MACHINES: dict[str, MachineSpec] = {
    spec.name: spec
    for spec in (
        MachineSpec(
            name="SynMotor",
            dataset="dev",
            character="harmonic",
            duration_s=10,
            attributes=(
                Attribute("spd", "f0", {"1": 40.0, "2": 50.0, "3": 60.0}, {"4": 72.0, "5": 86.0}),
                Attribute("load", "load", {"1": 0.0, "2": 1.0}, {"3": 2.0}),
            ),
            anomalies=("bearing", "subharmonic", "modulation", "rubbing"),
            params={
                "tilt_db_oct": -7.0,
                "tilt_per_load": 1.5,
                "am_depth": 0.08,
                "am_per_load": 0.1,
                "am_per_f0": 0.06,  # modulation rate / fundamental
                "wander": 0.004,
                "hiss_db": -22.0,
                "max_harmonic_hz": 6000.0,
                "resonance_hz": 1100.0,
                "resonance2_hz": 2900.0,
                "tonal_order": 36.0,  # rotor slot harmonic
                "tonal_db": 22.0,
                "sideband_db": 12.0,
            },
            near_snr_db=(0.0, 5.0),
            far_machine_db=(-20.0, -15.0),
            anomaly_levels={
                "bearing": (-30.0, -10.0),
                "subharmonic": (-22.0, 0.0),
                "modulation": (0.05, 0.5),
                "rubbing": (-30.0, -8.0),
            },
        ),
        MachineSpec(
            name="SynValve",
            dataset="dev",
            character="impulsive",
            duration_s=6,
            attributes=(
                Attribute("pat", "pattern", {"00": 0.0, "01": 1.0, "02": 2.0}, {"03": 3.0, "04": 4.0}),
            ),
            anomalies=("leak", "bounce", "resonance", "timing"),
            params={"hiss_db": -14.0, "hum_db": -26.0, "open_mode_hz": 1500.0, "close_mode_hz": 2300.0},
            near_snr_db=(4.0, 9.0),
            far_machine_db=(-3.0, -1.0),
            anomaly_levels={
                "leak": (-51.0, -20.0),
                "bounce": (-12.0, 8.0),
                "resonance": (0.0, 0.2),
                "timing": (0.0, 0.25),
            },
        ),
        MachineSpec(
            name="SynFan",
            dataset="dev",
            character="flow",
            duration_s=16,
            attributes=(
                Attribute(
                    "spd", "f_rot", {"a": 24.0, "b": 27.0, "c": 30.0}, {"d": 35.0, "e": 39.0}, hidden=True
                ),
            ),
            anomalies=("imbalance", "blade", "bearing", "clogging", "rubbing"),
            params={
                "blades": 7.0,
                "bpf_db": -12.0,
                "turbulence": 0.25,
                "wander": 0.003,
                "corner_hz": 700.0,
                "slope_db_oct": -5.0,
            },
            near_snr_db=(8.0, 14.0),
            far_machine_db=(-10.0, -6.0),
            anomaly_levels={
                "imbalance": (-30.0, -8.0),
                "blade": (-30.0, -8.0),
                "bearing": (-30.0, -10.0),
                "clogging": (0.05, 1.1),
                "rubbing": (-30.0, -6.0),
            },
        ),
        MachineSpec(
            name="SynGearbox",
            dataset="eval",
            character="harmonic",
            duration_s=10,
            attributes=(Attribute("spd", "f0", {"1": 22.0, "2": 26.0, "3": 30.0}, {"4": 35.0, "5": 41.0}),),
            anomalies=("bearing", "subharmonic", "modulation", "rubbing"),
            params={
                "load": 1.0,
                "tilt_db_oct": -6.0,
                "tilt_per_load": 0.0,
                "am_depth": 0.15,
                "am_per_load": 0.0,
                "am_per_f0": 0.06,
                "wander": 0.003,
                "hiss_db": -20.0,
                "max_harmonic_hz": 6000.0,
                "resonance_hz": 800.0,
                "resonance2_hz": 3400.0,
                "tonal_order": 23.0,  # gear mesh: teeth x shaft rotation, with rotation sidebands
                "tonal_db": 26.0,
                "sideband_db": 5.0,
            },
            near_snr_db=(0.0, 5.0),
            far_machine_db=(-8.0, -4.0),
            anomaly_levels={
                "bearing": (-30.0, -10.0),
                "subharmonic": (-22.0, 0.0),
                "modulation": (0.05, 0.5),
                "rubbing": (-30.0, -8.0),
            },
        ),
        MachineSpec(
            name="SynBlower",
            dataset="eval",
            character="flow",
            duration_s=6,
            attributes=(
                Attribute("spd", "f_rot", {"a": 40.0, "b": 46.0}, {"c": 55.0, "d": 62.0}, hidden=True),
            ),
            anomalies=("imbalance", "blade", "bearing", "clogging", "rubbing"),
            params={
                "blades": 11.0,
                "bpf_db": -16.0,
                "turbulence": 0.15,
                "wander": 0.004,
                "corner_hz": 350.0,
                "slope_db_oct": -6.5,
            },
            near_snr_db=(4.0, 10.0),
            far_machine_db=(-18.0, -12.0),
            anomaly_levels={
                "imbalance": (-30.0, -8.0),
                "blade": (-30.0, -8.0),
                "bearing": (-30.0, -10.0),
                "clogging": (0.05, 1.1),
                "rubbing": (-30.0, -6.0),
            },
        ),
    )
}

# Valve rhythms: (cycles per second, ((open, close) offsets as fractions of a cycle), ...).
VALVE_PATTERNS = (
    (1.0, ((0.0, 0.45),)),
    (1.5, ((0.0, 0.2), (0.5, 0.7))),
    (2.0, ((0.0, 0.3),)),
    (0.8, ((0.0, 0.15), (0.3, 0.45), (0.6, 0.8))),
    (1.2, ((0.0, 0.6),)),
)


@dataclass(frozen=True)
class ClipPlan:
    """Everything that identifies one clip and decides its name, before any audio is made."""

    machine: str
    split: str
    domain: str
    label: str
    index: int
    attributes: tuple[tuple[str, str], ...]  # every attribute, hidden ones included
    settings: tuple[tuple[str, float], ...]  # synthesis parameters set by the attributes
    anomaly: str  # "" for normal clips
    severity: float  # 0.0 for normal clips
    official_name: str  # development-style name (the eval test set hides it)
    file_name: str  # the name written to disk

    @property
    def dataset(self) -> str:
        return MACHINES[self.machine].dataset

    @property
    def relative_path(self) -> str:
        return f"{self.dataset}_data/raw/{self.machine}/{self.split}/{self.file_name}"


@dataclass(frozen=True)
class RenderedClip:
    """One clip's two channels (float, before quantisation) and the machine part of each."""

    near: np.ndarray
    far: np.ndarray
    near_machine: np.ndarray
    far_machine: np.ndarray


# ---------------------------------------------------------------- signal building blocks


def _db(level_db: float) -> float:
    return float(10.0 ** (level_db / 20.0))


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(np.square(x)))), 1e-12)


@functools.lru_cache(maxsize=16)
def _log_frequencies(n: int) -> np.ndarray:
    return np.log(np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 10.0))


def _shaped_noise(
    rng: np.random.Generator, n: int, corners_hz: Sequence[float], levels_db: Sequence[float], count: int = 0
) -> np.ndarray:
    """Unit-RMS Gaussian noise whose spectrum follows ``levels_db`` at ``corners_hz`` (log-frequency).

    Built directly in the frequency domain (one inverse FFT); ``count`` > 0 makes that many rows at once.
    """
    shape = (count, n // 2 + 1) if count else (n // 2 + 1,)
    gain_db = np.interp(_log_frequencies(n), np.log(corners_hz), levels_db).astype(np.float32)
    gain = np.exp(gain_db * np.float32(np.log(10.0) / 20.0))
    # uniform real and imaginary parts: each output sample sums thousands of bins, so it is Gaussian
    spectrum = (rng.random((*shape, 2), dtype=np.float32) - np.float32(0.5)).view(np.complex64)[..., 0]
    noise = scipy.fft.irfft(spectrum * gain, n, axis=-1)
    return noise / np.sqrt(np.mean(np.square(noise), axis=-1, keepdims=True))


def _smooth_random(rng: np.random.Generator, n: int, rate_hz: float, count: int = 0) -> np.ndarray:
    """Zero-mean, unit-variance random curve(s) that change about ``rate_hz`` times a second.

    Smoothstep interpolation between random knots on a coarse grid, then linear up to the sample rate.
    """
    knots = int(np.ceil(n / SAMPLE_RATE * rate_hz)) + 2
    values = rng.standard_normal((max(count, 1), knots))
    coarse = np.linspace(0.0, knots - 1.0, len(_coarse_times(n)))
    left = np.minimum(coarse.astype(np.int64), knots - 2)
    frac = coarse - left
    frac = frac * frac * (3.0 - 2.0 * frac)  # no kinks at the knots
    curves = values[:, left] * (1.0 - frac) + values[:, left + 1] * frac
    upsampled = _to_samples(curves, n)
    return upsampled if count else upsampled[0]


def _coarse_times(n: int) -> np.ndarray:
    """Times (s) of a grid 64 times coarser than the samples, for slowly varying curves."""
    return np.linspace(0.0, n / SAMPLE_RATE, n // 64 + 2)


def _to_samples(curves: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of curves on the coarse grid (last axis) up to ``n`` samples."""
    fine = np.linspace(0.0, curves.shape[-1] - 1.0, n)
    grid = np.arange(curves.shape[-1])
    if curves.ndim == 1:
        return np.interp(fine, grid, curves).astype(np.float32)
    return np.stack([np.interp(fine, grid, curve) for curve in curves]).astype(np.float32)


def _wavetable(phase_cycles: np.ndarray, amplitudes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A periodic wave with harmonic ``amplitudes`` (index 0 = harmonic 1) read along ``phase_cycles``."""
    table_size = 8192
    spectrum = np.zeros(table_size // 2 + 1, dtype=np.complex128)
    count = min(len(amplitudes), table_size // 2 - 1)
    spectrum[1 : count + 1] = amplitudes[:count] * np.exp(2j * np.pi * rng.random(count))
    table = np.fft.irfft(spectrum, table_size) * (table_size / 2.0)
    table = np.append(table, table[0])
    table = table.astype(np.float32)
    position = np.mod(phase_cycles * table_size, table_size)  # float64: exact just below a whole cycle
    left = np.minimum(position.astype(np.int32), table_size - 1)
    frac = (position - left).astype(np.float32)
    return table[left] * (1.0 - frac) + table[left + 1] * frac


def _events(n: int, times_s: np.ndarray, amplitudes: np.ndarray) -> np.ndarray:
    """An impulse train: ``amplitudes`` placed at ``times_s`` (times outside the clip are dropped)."""
    train = np.zeros(n, dtype=np.float32)
    samples = np.round(np.asarray(times_s) * SAMPLE_RATE).astype(np.int64)
    keep = (samples >= 0) & (samples < n)
    np.add.at(train, samples[keep], np.asarray(amplitudes, dtype=np.float32)[keep])
    return train


def _modes(freqs_hz: Sequence[float], decays_s: Sequence[float], gains: Sequence[float]) -> np.ndarray:
    """A click kernel: a sum of exponentially damped sinusoids (the resonant modes of a struck part)."""
    length = int(5 * max(decays_s) * SAMPLE_RATE) + 1
    t = np.arange(length) / SAMPLE_RATE
    freqs, decays, gains = (np.asarray(v, dtype=np.float64)[:, None] for v in (freqs_hz, decays_s, gains))
    return (gains * np.exp(-t / decays) * np.sin(2 * np.pi * freqs * t)).sum(axis=0).astype(np.float32)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # float32 throughout (float64 FFTs take twice as long); overlap-add suits the short kernels
    x, kernel = np.asarray(x, dtype=np.float32), np.asarray(kernel, dtype=np.float32)
    return scipy.signal.oaconvolve(x, kernel)[: len(x)]


def _periodic_impulses(rng: np.random.Generator, n: int, rate_hz: float, jitter: float) -> np.ndarray:
    """Event times at ``rate_hz`` with a random start and Gaussian jitter (a fraction of the period)."""
    period = 1.0 / rate_hz
    count = int(n / SAMPLE_RATE * rate_hz) + 2
    times = (np.arange(count) + rng.random()) * period
    return times + rng.normal(0.0, jitter * period, count)


def _bursts(rng: np.random.Generator, n: int, rate_hz: float, band_hz: tuple[float, float]) -> np.ndarray:
    """Unit-RMS band-limited noise bursts (10 to 40 ms) at about ``rate_hz``: rubbing contact."""
    times = np.sort(rng.random(max(1, rng.poisson(rate_hz * n / SAMPLE_RATE))) * n / SAMPLE_RATE)
    gate = _convolve(
        _events(n, times, rng.uniform(0.5, 1.0, len(times))),
        np.hanning(int(rng.uniform(0.01, 0.04) * SAMPLE_RATE)).astype(np.float32),
    )
    low, high = band_hz
    band = _shaped_noise(rng, n, (low / 2, low, high, high * 2), (-40.0, 0.0, 0.0, -40.0))
    return _unit_rms(band * gate)


def _bearing_impulses(rng: np.random.Generator, n: int, rotation_hz: float) -> np.ndarray:
    """Unit-RMS bearing-fault impulses: a defect rate of about 3.1x rotation, each ringing a high resonance,
    stronger once per revolution (load zone)."""
    times = _periodic_impulses(rng, n, rotation_hz * rng.uniform(2.8, 3.6), 0.02)
    load_zone = 0.6 + 0.4 * np.cos(2 * np.pi * rotation_hz * times)
    kernel = _modes([rng.uniform(2500.0, 4500.0)], [rng.uniform(0.002, 0.004)], [1.0])
    return _unit_rms(_convolve(_events(n, times, load_zone), kernel))


def _severity_level(spec: MachineSpec, kind: str, severity: float) -> float:
    low, high = spec.anomaly_levels[kind]
    return low + (high - low) * severity


# ---------------------------------------------------------------- machine characters


def _harmonic_machine(
    spec: MachineSpec, p: dict[str, float], n: int, rng: np.random.Generator, anomaly: str, severity: float
) -> np.ndarray:
    """Rotating machine: harmonic series (motor) or gear-mesh tones with sidebands (gearbox)."""
    f0 = p["f0"] * (1.0 + rng.uniform(-0.015, 0.015))
    load = p["load"] + rng.normal(0.0, 0.1)
    phase = np.cumsum(f0 * (1.0 + p["wander"] * _smooth_random(rng, n, 0.7))) / SAMPLE_RATE
    harmonic = np.arange(1, int(p["max_harmonic_hz"] / f0) + 1)
    freqs = harmonic * f0
    tilt = p["tilt_db_oct"] + p["tilt_per_load"] * load + rng.normal(0.0, 0.3)
    level_db = tilt * np.log2(harmonic) + rng.normal(0.0, 0.5, len(harmonic))
    # housing resonances lift the harmonics near them
    for centre in (p["resonance_hz"], p["resonance2_hz"]):
        level_db = level_db + 8.0 * np.exp(-0.5 * (np.log2(freqs / centre) / 0.3) ** 2)
    # slot or gear-mesh tones at multiples of ``tonal_order``, with rotation sidebands around them
    centres = p["tonal_order"] * np.arange(1, 4)
    distance = np.abs(harmonic[:, None] - centres[None, :])
    boost = (p["tonal_db"] - p["sideband_db"] * distance - 6.0 * np.arange(3)[None, :]).max(axis=1)
    level_db = level_db + np.maximum(boost, 0.0)
    tone = _wavetable(phase, 10.0 ** (level_db / 20.0), rng)
    am_depth = max(0.0, p["am_depth"] + p["am_per_load"] * load) * rng.uniform(0.85, 1.15)
    am_rate = p["am_per_f0"] * f0 * (1.0 + 0.15 * load) * rng.uniform(0.95, 1.05)
    t = np.arange(n) / SAMPLE_RATE
    modulation = 1.0 + am_depth * np.sin(2 * np.pi * am_rate * t + 2 * np.pi * rng.random())
    if anomaly == "modulation":  # a second, faster modulation (looseness, eccentricity)
        depth = _severity_level(spec, anomaly, severity)
        modulation = modulation * (1.0 + depth * np.sin(2 * np.pi * f0 * rng.uniform(0.1, 0.2) * t))
    hiss = _shaped_noise(rng, n, (100.0, 1000.0, 4000.0, 8000.0), (-20.0, 0.0, -3.0, -15.0))
    signal = _unit_rms(_unit_rms(tone) * modulation + _db(p["hiss_db"]) * hiss)
    return signal + _fault(spec, anomaly, severity, n, rng, rotation_hz=f0, phase=phase)


def _impulsive_machine(
    spec: MachineSpec, p: dict[str, float], n: int, rng: np.random.Generator, anomaly: str, severity: float
) -> np.ndarray:
    """Valve: opening/closing clicks in a rhythm, flow hiss while open, weak solenoid hum."""
    rate, strokes = VALVE_PATTERNS[int(round(p["pattern"]))]
    rate *= rng.uniform(0.97, 1.03)
    jitter = 0.01 + (_severity_level(spec, anomaly, severity) if anomaly == "timing" else 0.0)
    cycles = int(n / SAMPLE_RATE * rate) + 2
    start = rng.random() / rate
    offsets = np.asarray(strokes)  # (strokes, 2)
    times = (np.arange(cycles)[:, None, None] + offsets[None]) / rate + start - 1.0 / rate
    times = times + rng.normal(0.0, jitter / rate, times.shape)
    keep = np.ones(times.shape[:2], dtype=bool)
    if anomaly == "timing":  # some strokes are skipped entirely
        keep = rng.random(times.shape[:2]) > 0.8 * severity
    opens, closes = times[..., 0][keep], times[..., 1][keep]
    open_gain = rng.uniform(0.8, 1.2, len(opens))
    close_gain = rng.uniform(0.8, 1.2, len(closes))
    open_hz = p["open_mode_hz"] * rng.uniform(0.96, 1.04)
    close_hz = p["close_mode_hz"] * rng.uniform(0.96, 1.04)
    close_decay = 0.012 * rng.uniform(0.85, 1.15)
    if anomaly == "resonance":  # a worn seat: lower, longer-ringing closing click
        close_hz *= 1.0 - _severity_level(spec, anomaly, severity)
        close_decay *= 1.0 + severity
    open_kernel = _modes([open_hz, open_hz * 2.3, 5200.0], [0.006, 0.004, 0.002], [1.0, 0.6, 0.3])
    close_kernel = _modes(
        [close_hz, close_hz * 1.9, close_hz * 2.7], [close_decay, 0.006, 0.003], [1.6, 0.9, 0.5]
    )
    # scale the clicks by the energy the planned strokes would have, so skipped or added strokes change it
    planned = ((times >= 0.0) & (times < n / SAMPLE_RATE)).sum(axis=(0, 1))  # (opens, closes) in the clip
    energy = planned[0] * np.sum(open_kernel**2) + planned[1] * np.sum(close_kernel**2)
    click_gain = 1.0 / np.sqrt(max(float(energy), 1e-12) / n)
    clicks = _convolve(_events(n, opens, open_gain), open_kernel) + _convolve(
        _events(n, closes, close_gain), close_kernel
    )
    if anomaly == "bounce":  # the closing member bounces once on its seat
        bounce = _events(n, closes + rng.uniform(0.015, 0.04), close_gain)
        clicks = clicks + _db(_severity_level(spec, anomaly, severity)) * _convolve(bounce, close_kernel)
    # flow hiss while the valve is open: +1 at each opening, -1 at each closing, summed over time
    edges = np.zeros(n + 1, dtype=np.float32)
    starts = np.clip(np.round(opens * SAMPLE_RATE), 0, n).astype(np.int64)
    np.add.at(edges, starts, 1.0)
    np.add.at(edges, np.maximum(np.clip(np.round(closes * SAMPLE_RATE), 0, n).astype(np.int64), starts), -1.0)
    gate = _convolve(np.clip(np.cumsum(edges)[:n], 0.0, 1.0), np.hanning(160).astype(np.float32) / 80.0)
    hiss = _shaped_noise(rng, n, (500.0, 1500.0, 5000.0, 8000.0), (-25.0, 0.0, -2.0, -12.0))
    hiss_gain = _db(p["hiss_db"] + rng.uniform(-1.0, 1.0))
    hum_phase = np.arange(n) * (100.0 * rng.uniform(0.995, 1.005) / SAMPLE_RATE)
    hum = _wavetable(hum_phase, 0.5 ** np.arange(8), rng)
    signal = click_gain * clicks + hiss_gain * hiss * gate + _db(p["hum_db"]) * _unit_rms(hum)
    if anomaly == "leak":  # a thin, high whistle through the closed valve
        leak = _shaped_noise(rng, n, (2000.0, 4000.0, 6000.0, 8000.0), (-30.0, 0.0, 0.0, -20.0))
        signal = signal + _db(_severity_level(spec, anomaly, severity)) * leak * (1.0 - 0.7 * gate)
    return signal


def _flow_machine(
    spec: MachineSpec, p: dict[str, float], n: int, rng: np.random.Generator, anomaly: str, severity: float
) -> np.ndarray:
    """Fan/blower: turbulent broadband noise plus blade-pass tones on a slowly wandering rotation."""
    f_rot = p["f_rot"] * (1.0 + rng.uniform(-0.01, 0.01))
    phase = np.cumsum(f_rot * (1.0 + p["wander"] * _smooth_random(rng, n, 0.5))) / SAMPLE_RATE
    corner = p["corner_hz"] * rng.uniform(0.9, 1.1)
    slope = p["slope_db_oct"] + rng.normal(0.0, 0.2)
    if anomaly == "clogging":  # obstructed flow: the spectrum above the corner gets steeper
        slope -= _severity_level(spec, anomaly, severity)
    corners = np.array([50.0, corner, corner * 4, corner * 16])
    noise = _shaped_noise(rng, n, corners, (-6.0, 0.0, 2 * slope, 4 * slope))
    turbulence = 1.0 + p["turbulence"] * _smooth_random(rng, n, 2.0)
    harmonic = np.arange(1, int(3000.0 / f_rot) + 1)
    blades = int(p["blades"])
    tonal_db = np.where(harmonic % blades == 0, -6.0 * (harmonic // blades - 1), -60.0)
    tonal_db[0] = -20.0
    tonal_db = tonal_db + rng.normal(0.0, 0.5, len(harmonic))
    tone = _unit_rms(_wavetable(phase, 10.0 ** (tonal_db / 20.0), rng))
    if anomaly == "blade":  # a damaged blade: every revolution differs, harmonics between blade passes
        tone = tone + _db(_severity_level(spec, anomaly, severity) - p["bpf_db"]) * _unit_rms(
            _wavetable(phase, np.where(harmonic % blades == 0, 0.0, 1.0 / harmonic), rng)
        )
    signal = _unit_rms(noise * turbulence + _db(p["bpf_db"]) * tone)
    if anomaly == "imbalance":  # a once-per-revolution tone and swish
        level = _db(_severity_level(spec, anomaly, severity))
        swish = np.sin(2 * np.pi * phase)
        signal = signal * (1.0 + 2.0 * level * swish) + level * swish
    return signal + _fault(spec, anomaly, severity, n, rng, rotation_hz=f_rot, phase=phase)


def _fault(
    spec: MachineSpec,
    anomaly: str,
    severity: float,
    n: int,
    rng: np.random.Generator,
    rotation_hz: float,
    phase: np.ndarray,
) -> np.ndarray | float:
    """The additive faults shared by rotating machines: bearing impulses, sub-harmonics, rubbing."""
    if anomaly == "bearing":
        return _db(_severity_level(spec, anomaly, severity)) * _bearing_impulses(rng, n, rotation_hz)
    if anomaly == "subharmonic":  # half-order harmonics: looseness
        orders = np.arange(1, 13)
        half_orders = np.where(orders % 2 == 1, 1.0 / orders, 0.0)
        return _db(_severity_level(spec, anomaly, severity)) * _unit_rms(
            _wavetable(phase / 2, half_orders, rng)
        )
    if anomaly == "rubbing":
        centre = rng.uniform(1000.0, 3000.0)
        burst = _bursts(rng, n, rotation_hz / rng.uniform(2.0, 6.0), (centre / 1.5, centre * 1.5))
        return _db(_severity_level(spec, anomaly, severity)) * burst
    return 0.0


CHARACTERS = {"harmonic": _harmonic_machine, "impulsive": _impulsive_machine, "flow": _flow_machine}


# ---------------------------------------------------------------- environment and channels


def _environment(rng: np.random.Generator, n: int, weights: dict[str, float]) -> np.ndarray:
    """Unit-RMS environmental noise: a per-clip random mix of babble, mains hum, traffic and clanks."""
    duration = n / SAMPLE_RATE
    speech = _shaped_noise(rng, n, (100.0, 400.0, 1000.0, 4000.0, 8000.0), (-20.0, 0.0, -3.0, -18.0, -30.0))
    babble = speech * np.maximum(1.0 + 0.6 * _smooth_random(rng, n, 6.0), 0.1)  # syllabic fluctuation
    mains = rng.choice([50.0, 60.0])
    hum = _wavetable(
        np.arange(n) * (mains / SAMPLE_RATE), np.array([1.0, 0.3, 0.6, 0.1, 0.3, 0.05, 0.15]), rng
    )
    rumble = _shaped_noise(rng, n, (20.0, 80.0, 400.0, 2000.0, 8000.0), (0.0, 0.0, -14.0, -40.0, -60.0))
    passes = rng.random(rng.poisson(0.3 * duration) + 1) * duration
    t = _coarse_times(n)
    swell = 0.3 + np.exp(-0.5 * ((t[None, :] - passes[:, None]) / rng.uniform(1.0, 2.5)) ** 2).sum(axis=0)
    traffic = rumble * _to_samples(swell, n)  # vehicles passing by
    clank_times = rng.random(rng.poisson(0.8 * duration) + 1) * duration
    clank_kernel = _modes(rng.uniform(400.0, 3500.0, 3), rng.uniform(0.02, 0.08, 3), rng.uniform(0.3, 1.0, 3))
    clanks = _convolve(_events(n, clank_times, np.exp(rng.normal(0.0, 0.6, len(clank_times)))), clank_kernel)
    parts = {"babble": babble, "hum": hum, "traffic": traffic, "clank": clanks}
    mix = sum(weights[kind] * rng.uniform(0.5, 1.5) * _unit_rms(parts[kind]) for kind in NOISE_KINDS)
    return _unit_rms(mix)


def room_response(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """Synthetic far-field room impulse response: a direct path after a short delay, then exponentially
    decaying noise (reverberation time ``rt60`` seconds) starting with the first reflections."""
    length = int(min(rt60, 0.5) * SAMPLE_RATE)
    delay = int(rng.uniform(0.003, 0.01) * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-6.9 * t / rt60)
    tail[: delay + int(0.002 * SAMPLE_RATE)] = 0.0
    response = tail / np.sqrt(np.sum(tail**2)) * rng.uniform(0.9, 1.1)  # reverberant energy near the direct
    response[delay] += 1.0
    return response.astype(np.float32)


def noise_path(rng: np.random.Generator, delay_s: float, rt60: float) -> np.ndarray:
    """Impulse response from the noise sources to one microphone: a direct path after ``delay_s``, a few
    early reflections and a short exponentially decaying tail (each microphone draws its own)."""
    delay = int(delay_s * SAMPLE_RATE)
    length = delay + int(rt60 * SAMPLE_RATE)
    response = np.zeros(length, dtype=np.float64)
    response[delay] = 1.0
    reflections = delay + (rng.uniform(0.001, 0.015, 4) * SAMPLE_RATE).astype(np.int64)
    np.add.at(response, np.minimum(reflections, length - 1), rng.uniform(-0.3, 0.3, 4))
    t = np.arange(length - delay) / SAMPLE_RATE
    tail = rng.standard_normal(length - delay) * np.exp(-6.9 * t / rt60)
    tail[: int(0.005 * SAMPLE_RATE)] = 0.0
    response[delay:] += NOISE_TAIL_GAIN * tail / np.sqrt(np.sum(tail**2))  # below the direct sound
    return response.astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-12)


def render_clip(plan: ClipPlan, seed: int) -> RenderedClip:
    """Synthesize one clip (float, unquantised) from its plan; deterministic given (plan, seed)."""
    spec = MACHINES[plan.machine]
    rng = np.random.default_rng(
        _clip_seed(seed, plan.machine, plan.split, plan.domain, plan.label, plan.index)[1]
    )
    n = spec.duration_s * SAMPLE_RATE
    machine = CHARACTERS[spec.character](
        spec, {**spec.params, **dict(plan.settings)}, n, rng, plan.anomaly, plan.severity
    ).astype(np.float32)
    machine = machine * rng.uniform(0.92, 1.08)  # level nuisance, about +-0.7 dB
    # the environment: one realisation of the sources, heard by each microphone through its own path
    # (the far microphone is nearer the sources: it hears them first and louder), plus a diffuse part
    # independent per microphone
    environment = _environment(rng, n, BACKGROUND_WEIGHTS[plan.domain])
    far_delay = rng.uniform(0.001, 0.004)
    near_delay = far_delay + rng.uniform(*NOISE_PATH_DELAY_S)
    rt60 = rng.uniform(*NOISE_PATH_RT60_S)
    coherent = [
        _convolve(environment, noise_path(rng, delay, rt60 * rng.uniform(0.85, 1.15)))
        for delay in (near_delay, far_delay)
    ]
    diffuse = _shaped_noise(rng, n, (50.0, 500.0, 8000.0), (0.0, -3.0, -20.0), 2)
    independent_gain = [_db(rng.uniform(*INDEPENDENT_NOISE_DB)) for _ in range(2)]
    near_noise, far_noise = (
        _unit_rms(part) + gain * diffuse[i] for i, (part, gain) in enumerate(zip(coherent, independent_gain))
    )
    near_noise = near_noise / _rms(near_noise) * _rms(machine) * _db(-rng.uniform(*spec.near_snr_db))
    far_noise = far_noise / _rms(far_noise) * _rms(near_noise) * _db(rng.uniform(*FAR_NOISE_GAIN_DB))
    reverberant = _convolve(machine, room_response(rng, ROOM_RT60[plan.domain] * rng.uniform(0.9, 1.1)))
    far_machine = reverberant / _rms(reverberant) * _rms(machine) * _db(rng.uniform(*spec.far_machine_db))
    return RenderedClip(
        near=OUTPUT_GAIN * (machine + near_noise),
        far=OUTPUT_GAIN * (far_machine + far_noise),
        near_machine=OUTPUT_GAIN * machine,
        far_machine=OUTPUT_GAIN * far_machine,
    )


# ---------------------------------------------------------------- planning: which clips, which names


def _clip_seed(seed: int, machine: str, split: str, domain: str, label: str, index: int) -> list:
    """Two independent seed sequences for one clip (plan, audio), from its identity only."""
    entropy = [
        seed,
        zlib.crc32(machine.encode()),
        SPLITS.index(split),
        DOMAINS.index(domain),
        LABELS.index(label),
        index,
    ]
    return np.random.SeedSequence(entropy).spawn(2)


def clip_counts(scale: float) -> dict[str, int]:
    """Clips per machine at ``scale``: source and target training clips, test clips per cell."""
    _check_scale(scale)
    return {
        "source_train": max(1, round(SOURCE_TRAIN_CLIPS * scale)),
        "target_train": TARGET_TRAIN_CLIPS,
        "test_per_cell": max(1, round(TEST_CLIPS_PER_CELL * scale)),
    }


def _attribute_string(spec: MachineSpec, attributes: dict[str, str]) -> str:
    visible = [f"{a.key}_{attributes[a.key]}" for a in spec.attributes if not a.hidden]
    return "_".join(visible) if visible else "noAttribute"


def _plan_clip(spec: MachineSpec, seed: int, split: str, domain: str, label: str, index: int) -> ClipPlan:
    values = [getattr(attribute, domain) for attribute in spec.attributes]
    combinations = list(itertools.product(*(sorted(v) for v in values)))
    combination = combinations[index % len(combinations)]  # cycling keeps every cell balanced
    attributes = {a.key: value for a, value in zip(spec.attributes, combination)}
    settings = tuple((a.parameter, getattr(a, domain)[attributes[a.key]]) for a in spec.attributes)
    anomaly, severity = "", 0.0
    if label == "anomaly":
        rng = np.random.default_rng(_clip_seed(seed, spec.name, split, domain, label, index)[0])
        anomaly = spec.anomalies[int(rng.integers(len(spec.anomalies)))]
        severity = round(float(rng.uniform(*SEVERITY_RANGE)), 4)
    name = f"section_00_{domain}_{split}_{label}_{index:04d}_{_attribute_string(spec, attributes)}.wav"
    return ClipPlan(
        machine=spec.name,
        split=split,
        domain=domain,
        label=label,
        index=index,
        attributes=tuple(attributes.items()),
        settings=settings,
        anomaly=anomaly,
        severity=severity,
        official_name=name,
        file_name=name,
    )


def plan_machine(machine: str, *, scale: float = 1.0, seed: int = 0) -> list[ClipPlan]:
    """Every clip of one machine type (train, then test), with the names it will be written under."""
    if machine not in MACHINES:
        raise ValueError(f"unknown synthetic machine {machine!r}; expected one of {sorted(MACHINES)}")
    spec = MACHINES[machine]
    counts = clip_counts(scale)
    plans = [_plan_clip(spec, seed, "train", "source", "normal", i) for i in range(counts["source_train"])]
    plans += [_plan_clip(spec, seed, "train", "target", "normal", i) for i in range(counts["target_train"])]
    test = [
        _plan_clip(spec, seed, "test", domain, label, i)
        for domain in DOMAINS
        for label in LABELS
        for i in range(counts["test_per_cell"])
    ]
    if spec.dataset == "eval":  # hidden names in a seeded random order, as in the evaluation set
        order = np.random.default_rng([seed, zlib.crc32(machine.encode()), 99]).permutation(len(test))
        hidden = [None] * len(test)
        for position, clip_index in enumerate(order):
            hidden[position] = dataclasses.replace(
                test[clip_index], file_name=f"section_00_{position:04d}.wav"
            )
        test = hidden
    return plans + test


# ---------------------------------------------------------------- writing


def _check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def _write_clip(root: Path, plan: ClipPlan, seed: int, layout: str) -> None:
    clip = render_clip(plan, seed)
    audio = np.stack([clip.near, clip.far], axis=1) if layout == "2026" else clip.near
    pcm = np.round(np.clip(audio, -1.0, 32767 / 32768) * 32768).astype(np.int16)
    with atomic_path(root / plan.relative_path) as tmp:
        sf.write(tmp, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _write_clip_task(task: tuple[str, ClipPlan, int, str]) -> None:
    root, plan, seed, layout = task
    _write_clip(Path(root), plan, seed, layout)


def _csv_text(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_tables(root: Path, plans_by_machine: dict[str, list[ClipPlan]]) -> None:
    """attributes_00.csv per machine, the evaluation ground truth, and the clip table."""
    for machine, plans in plans_by_machine.items():
        spec = MACHINES[machine]
        visible = [a.key for a in spec.attributes if not a.hidden]
        listed = [p for p in plans if spec.dataset == "dev" or p.split == "train"]
        if visible:
            header = ["file_name"] + [
                f"d{i}{kind}" for i in range(1, len(visible) + 1) for kind in ("p", "v")
            ]
            rows = [
                [f"{machine}/{p.split}/{p.file_name}"]
                + [item for key in visible for item in (key, dict(p.attributes)[key])]
                for p in listed
            ]
        else:
            header = ["file_name", "d1p", "d1v"]
            rows = [[f"{machine}/{p.split}/{p.file_name}", "noAttribute", ""] for p in listed]
        write_text_atomic(
            root / f"{spec.dataset}_data/raw/{machine}/attributes_00.csv", _csv_text(rows, header)
        )
        if spec.dataset == "eval":
            test = sorted((p for p in plans if p.split == "test"), key=lambda p: p.file_name)
            truth = root / "eval_ground_truth"
            stem = f"ground_truth_{machine}_section_00_test.csv"
            write_text_atomic(
                truth / "ground_truth_data" / stem,
                _csv_text([p.file_name, int(p.label == "anomaly")] for p in test),
            )
            write_text_atomic(
                truth / "ground_truth_domain" / stem,
                _csv_text([p.file_name, int(p.domain == "target")] for p in test),
            )
            write_text_atomic(
                truth / "ground_truth_attributes" / stem,
                _csv_text([p.file_name, p.official_name.removesuffix(".wav")] for p in test),
            )
    header = [
        "path",
        "machine",
        "dataset",
        "split",
        "domain",
        "label",
        "official_name",
        "attributes",
        "anomaly",
        "severity",
        "duration_s",
    ]
    rows = [
        [
            p.relative_path,
            p.machine,
            p.dataset,
            p.split,
            p.domain,
            p.label,
            p.official_name,
            "_".join(f"{k}_{v}" for k, v in p.attributes),
            p.anomaly,
            f"{p.severity:.4f}",
            MACHINES[p.machine].duration_s,
        ]
        for plans in plans_by_machine.values()
        for p in plans
    ]
    write_text_atomic(root / CLIPS_CSV_NAME, _csv_text(rows, header))


def _parameters(seed: int, scale: float, layout: str, machines: Sequence[str]) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "scale": float(scale),
        "layout": layout,
        "machines": list(machines),
    }


def _read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST_NAME
    if not path.exists():
        if any((root / folder).exists() for folder in ("dev_data", "eval_data", "eval_ground_truth")):
            raise FileExistsError(
                f"{root} already holds a dataset that kit.synth did not write (no {MANIFEST_NAME}); "
                "choose an empty folder for the synthetic dataset"
            )
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete {root} and generate again") from error


def generate(
    root: str | os.PathLike,
    *,
    scale: float = 1.0,
    seed: int = 0,
    layout: str = "2026",
    machines: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the synthetic dataset under ``root`` and return its summary (also in ``synth_manifest.json``).

    ``layout="2026"`` writes stereo near/far clips; ``"mono"`` the 2023-style mono clips (near channel).
    ``machines`` picks a subset of ``MACHINES`` (default: all). ``workers`` processes write clips in
    parallel (default: the CPU count, at most 4); the files are the same for any number of workers.
    A finished dataset with the same parameters is not written again; an interrupted one is completed.
    """
    _check_scale(scale)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    machines = list(MACHINES) if machines is None else list(machines)
    unknown = [m for m in machines if m not in MACHINES]
    if unknown or not machines:
        raise ValueError(
            f"unknown or no synthetic machines {unknown or machines}; expected some of {list(MACHINES)}"
        )
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"dataset root {root} is a file; expected a folder (empty or a kit.synth dataset)"
        )
    parameters = _parameters(int(seed), scale, layout, machines)

    manifest = _read_manifest(root)
    if manifest is not None:
        if {key: manifest.get(key) for key in parameters} != parameters:
            raise FileExistsError(
                f"{root} holds a synthetic dataset generated with other parameters "
                f"({ {key: manifest.get(key) for key in parameters} }, asked {parameters}); "
                "delete it or choose another root"
            )
        if manifest.get("complete"):
            return manifest
    write_text_atomic(root / MANIFEST_NAME, json.dumps({**parameters, "complete": False}, indent=2) + "\n")

    plans_by_machine = {m: plan_machine(m, scale=scale, seed=int(seed)) for m in machines}
    # an interrupted run resumes: files are written atomically, so an existing file is complete
    todo = [
        (str(root), p, int(seed), layout)
        for plans in plans_by_machine.values()
        for p in plans
        if not (root / p.relative_path).exists()
    ]
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    with tqdm(total=len(todo), desc="synthetic dataset", unit="clip", disable=not progress) as bar:
        if workers == 1 or len(todo) < 2:
            for task in todo:
                _write_clip_task(task)
                bar.update()
        else:
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                for _ in pool.map(_write_clip_task, todo, chunksize=4):
                    bar.update()
    _write_tables(root, plans_by_machine)

    summary = {
        **parameters,
        "complete": True,
        "sample_rate": SAMPLE_RATE,
        "channels": 2 if layout == "2026" else 1,
        "clip_counts": clip_counts(scale),
        "machine_types": {
            m: {
                "dataset": MACHINES[m].dataset,
                "duration_s": MACHINES[m].duration_s,
                "attributes": [a.key for a in MACHINES[m].attributes if not a.hidden] or ["noAttribute"],
                "clips": len(plans),
            }
            for m, plans in plans_by_machine.items()
        },
        "clips": sum(len(plans) for plans in plans_by_machine.values()),
        "audio_seconds": sum(len(plans) * MACHINES[m].duration_s for m, plans in plans_by_machine.items()),
        "bytes": sum(
            (root / p.relative_path).stat().st_size for plans in plans_by_machine.values() for p in plans
        ),
    }
    text = json.dumps(summary, indent=2) + "\n"
    write_text_atomic(root / MANIFEST_NAME, text)
    return json.loads(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit.synth", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "root", help="folder to write the dataset into (empty or a previous kit.synth dataset)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the source and test clip counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="2026", help="2026: stereo near/far; mono: near")
    parser.add_argument("--machines", nargs="+", choices=list(MACHINES), help="a subset of machine types")
    parser.add_argument("--workers", type=int, help="parallel processes (default: CPU count, at most 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = generate(
        args.root,
        scale=args.scale,
        seed=args.seed,
        layout=args.layout,
        machines=args.machines,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(
        f"{summary['clips']} clips, {summary['audio_seconds'] / 60:.0f} min of audio, "
        f"{summary['bytes'] / 1e6:.0f} MB in {args.root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
