"""Signal building blocks of the synthetic machines and their environment (``kit.synth``).

Plain NumPy/SciPy functions of a random generator and a length in samples at ``SAMPLE_RATE``: noise
with a given spectrum, slowly varying random curves, a wavetable oscillator, impulse trains, the
damped resonant modes of a struck part, and the fault signals built from them (rubbing bursts,
bearing impulses). Float32 wherever the result is audio.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.signal

SAMPLE_RATE = 16_000


def db(level_db: float) -> float:
    return float(10.0 ** (level_db / 20.0))


def unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(np.square(x)))), 1e-12)


def rms(x: np.ndarray) -> float:
    return max(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))), 1e-12)


@functools.lru_cache(maxsize=16)
def log_frequencies(n: int) -> np.ndarray:
    return np.log(np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 10.0))


def shaped_noise(
    rng: np.random.Generator, n: int, corners_hz: Sequence[float], levels_db: Sequence[float], count: int = 0
) -> np.ndarray:
    """Unit-RMS Gaussian noise whose spectrum follows ``levels_db`` at ``corners_hz`` (log-frequency).

    Built directly in the frequency domain (one inverse FFT); ``count`` > 0 makes that many rows at once.
    """
    shape = (count, n // 2 + 1) if count else (n // 2 + 1,)
    gain_db = np.interp(log_frequencies(n), np.log(corners_hz), levels_db).astype(np.float32)
    gain = np.exp(gain_db * np.float32(np.log(10.0) / 20.0))
    # uniform real and imaginary parts: each output sample sums thousands of bins, so it is Gaussian
    spectrum = (rng.random((*shape, 2), dtype=np.float32) - np.float32(0.5)).view(np.complex64)[..., 0]
    noise = scipy.fft.irfft(spectrum * gain, n, axis=-1)
    return noise / np.sqrt(np.mean(np.square(noise), axis=-1, keepdims=True))


def smooth_random(rng: np.random.Generator, n: int, rate_hz: float, count: int = 0) -> np.ndarray:
    """Zero-mean, unit-variance random curve(s) that change about ``rate_hz`` times a second.

    Smoothstep interpolation between random knots on a coarse grid, then linear up to the sample rate.
    """
    knots = int(np.ceil(n / SAMPLE_RATE * rate_hz)) + 2
    values = rng.standard_normal((max(count, 1), knots))
    coarse = np.linspace(0.0, knots - 1.0, len(coarse_times(n)))
    left = np.minimum(coarse.astype(np.int64), knots - 2)
    frac = coarse - left
    frac = frac * frac * (3.0 - 2.0 * frac)  # no kinks at the knots
    curves = values[:, left] * (1.0 - frac) + values[:, left + 1] * frac
    upsampled = to_samples(curves, n)
    return upsampled if count else upsampled[0]


def coarse_times(n: int) -> np.ndarray:
    """Times (s) of a grid 64 times coarser than the samples, for slowly varying curves."""
    return np.linspace(0.0, n / SAMPLE_RATE, n // 64 + 2)


def to_samples(curves: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of curves on the coarse grid (last axis) up to ``n`` samples."""
    fine = np.linspace(0.0, curves.shape[-1] - 1.0, n)
    grid = np.arange(curves.shape[-1])
    if curves.ndim == 1:
        return np.interp(fine, grid, curves).astype(np.float32)
    return np.stack([np.interp(fine, grid, curve) for curve in curves]).astype(np.float32)


def wavetable(phase_cycles: np.ndarray, amplitudes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


def events(n: int, times_s: np.ndarray, amplitudes: np.ndarray) -> np.ndarray:
    """An impulse train: ``amplitudes`` placed at ``times_s`` (times outside the clip are dropped)."""
    train = np.zeros(n, dtype=np.float32)
    samples = np.round(np.asarray(times_s) * SAMPLE_RATE).astype(np.int64)
    keep = (samples >= 0) & (samples < n)
    np.add.at(train, samples[keep], np.asarray(amplitudes, dtype=np.float32)[keep])
    return train


def modes(freqs_hz: Sequence[float], decays_s: Sequence[float], gains: Sequence[float]) -> np.ndarray:
    """A click kernel: a sum of exponentially damped sinusoids (the resonant modes of a struck part)."""
    length = int(5 * max(decays_s) * SAMPLE_RATE) + 1
    t = np.arange(length) / SAMPLE_RATE
    freqs, decays, gains = (np.asarray(v, dtype=np.float64)[:, None] for v in (freqs_hz, decays_s, gains))
    return (gains * np.exp(-t / decays) * np.sin(2 * np.pi * freqs * t)).sum(axis=0).astype(np.float32)


def convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # float32 throughout (float64 FFTs take twice as long); overlap-add suits the short kernels
    x, kernel = np.asarray(x, dtype=np.float32), np.asarray(kernel, dtype=np.float32)
    return scipy.signal.oaconvolve(x, kernel)[: len(x)]


def periodic_impulses(rng: np.random.Generator, n: int, rate_hz: float, jitter: float) -> np.ndarray:
    """Event times at ``rate_hz`` with a random start and Gaussian jitter (a fraction of the period)."""
    period = 1.0 / rate_hz
    count = int(n / SAMPLE_RATE * rate_hz) + 2
    times = (np.arange(count) + rng.random()) * period
    return times + rng.normal(0.0, jitter * period, count)


def bursts(rng: np.random.Generator, n: int, rate_hz: float, band_hz: tuple[float, float]) -> np.ndarray:
    """Unit-RMS band-limited noise bursts (10 to 40 ms) at about ``rate_hz``: rubbing contact."""
    times = np.sort(rng.random(max(1, rng.poisson(rate_hz * n / SAMPLE_RATE))) * n / SAMPLE_RATE)
    gate = convolve(
        events(n, times, rng.uniform(0.5, 1.0, len(times))),
        np.hanning(int(rng.uniform(0.01, 0.04) * SAMPLE_RATE)).astype(np.float32),
    )
    low, high = band_hz
    band = shaped_noise(rng, n, (low / 2, low, high, high * 2), (-40.0, 0.0, 0.0, -40.0))
    return unit_rms(band * gate)


def bearing_impulses(rng: np.random.Generator, n: int, rotation_hz: float) -> np.ndarray:
    """Unit-RMS bearing-fault impulses: a defect rate of about 3.1x rotation, each ringing a high resonance,
    stronger once per revolution (load zone)."""
    times = periodic_impulses(rng, n, rotation_hz * rng.uniform(2.8, 3.6), 0.02)
    load_zone = 0.6 + 0.4 * np.cos(2 * np.pi * rotation_hz * times)
    kernel = modes([rng.uniform(2500.0, 4500.0)], [rng.uniform(0.002, 0.004)], [1.0])
    return unit_rms(convolve(events(n, times, load_zone), kernel))
