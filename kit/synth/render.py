"""One synthetic clip's two channels (``kit.synth``): the machine, its environment, rooms and levels.

Channels (stereo, 16 kHz; channel 0 = near, channel 1 = far), as in the 2026 data, where noise matters
on the near microphone and the far one is a noise reference that also hears the machine:

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

The background differs between the domains (``BACKGROUND_WEIGHTS``), and so does the far room
(``ROOM_RT60``). The machine signal alone is known: ``render_clip(plan, seed)`` re-renders any clip with
its machine part per channel (``kit.tools.synth_check`` scores this ``clean`` channel; nothing extra is
written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kit.synth.machines import MACHINES
from kit.synth.plan import ClipPlan, clip_seeds
from kit.synth.signals import (
    SAMPLE_RATE,
    coarse_times,
    convolve,
    db,
    events,
    modes,
    rms,
    shaped_noise,
    smooth_random,
    to_samples,
    unit_rms,
    wavetable,
)
from kit.synth.sounds import CHARACTERS

OUTPUT_GAIN = 0.015  # RMS of the near-channel machine sound: -36.5 dBFS (real recordings: about -40)
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
class RenderedClip:
    """One clip's two channels (float, before quantisation) and the machine part of each."""

    near: np.ndarray
    far: np.ndarray
    near_machine: np.ndarray
    far_machine: np.ndarray


def _environment(rng: np.random.Generator, n: int, weights: dict[str, float]) -> np.ndarray:
    """Unit-RMS environmental noise: a per-clip random mix of babble, mains hum, traffic and clanks."""
    duration = n / SAMPLE_RATE
    speech = shaped_noise(rng, n, (100.0, 400.0, 1000.0, 4000.0, 8000.0), (-20.0, 0.0, -3.0, -18.0, -30.0))
    babble = speech * np.maximum(1.0 + 0.6 * smooth_random(rng, n, 6.0), 0.1)  # syllabic fluctuation
    mains = rng.choice([50.0, 60.0])
    hum = wavetable(
        np.arange(n) * (mains / SAMPLE_RATE), np.array([1.0, 0.3, 0.6, 0.1, 0.3, 0.05, 0.15]), rng
    )
    rumble = shaped_noise(rng, n, (20.0, 80.0, 400.0, 2000.0, 8000.0), (0.0, 0.0, -14.0, -40.0, -60.0))
    passes = rng.random(rng.poisson(0.3 * duration) + 1) * duration
    t = coarse_times(n)
    swell = 0.3 + np.exp(-0.5 * ((t[None, :] - passes[:, None]) / rng.uniform(1.0, 2.5)) ** 2).sum(axis=0)
    traffic = rumble * to_samples(swell, n)  # vehicles passing by
    clank_times = rng.random(rng.poisson(0.8 * duration) + 1) * duration
    clank_kernel = modes(rng.uniform(400.0, 3500.0, 3), rng.uniform(0.02, 0.08, 3), rng.uniform(0.3, 1.0, 3))
    clanks = convolve(events(n, clank_times, np.exp(rng.normal(0.0, 0.6, len(clank_times)))), clank_kernel)
    parts = {"babble": babble, "hum": hum, "traffic": traffic, "clank": clanks}
    mix = sum(weights[kind] * rng.uniform(0.5, 1.5) * unit_rms(parts[kind]) for kind in NOISE_KINDS)
    return unit_rms(mix)


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


def render_clip(plan: ClipPlan, seed: int) -> RenderedClip:
    """Synthesize one clip (float, unquantised) from its plan; deterministic given (plan, seed)."""
    spec = MACHINES[plan.machine]
    rng = np.random.default_rng(
        clip_seeds(seed, plan.machine, plan.split, plan.domain, plan.label, plan.index)[1]
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
        convolve(environment, noise_path(rng, delay, rt60 * rng.uniform(0.85, 1.15)))
        for delay in (near_delay, far_delay)
    ]
    diffuse = shaped_noise(rng, n, (50.0, 500.0, 8000.0), (0.0, -3.0, -20.0), 2)
    independent_gain = [db(rng.uniform(*INDEPENDENT_NOISE_DB)) for _ in range(2)]
    near_noise, far_noise = (
        unit_rms(part) + gain * diffuse[i] for i, (part, gain) in enumerate(zip(coherent, independent_gain))
    )
    near_noise = near_noise / rms(near_noise) * rms(machine) * db(-rng.uniform(*spec.near_snr_db))
    far_noise = far_noise / rms(far_noise) * rms(near_noise) * db(rng.uniform(*FAR_NOISE_GAIN_DB))
    reverberant = convolve(machine, room_response(rng, ROOM_RT60[plan.domain] * rng.uniform(0.9, 1.1)))
    far_machine = reverberant / rms(reverberant) * rms(machine) * db(rng.uniform(*spec.far_machine_db))
    return RenderedClip(
        near=OUTPUT_GAIN * (machine + near_noise),
        far=OUTPUT_GAIN * (far_machine + far_noise),
        near_machine=OUTPUT_GAIN * machine,
        far_machine=OUTPUT_GAIN * far_machine,
    )
