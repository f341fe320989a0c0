"""The sound of each synthetic machine character (``kit.synth``), normal and faulty.

A character function ``(spec, params, n, rng, anomaly, severity) -> unit-level machine sound`` renders
``n`` samples of one machine from its ``MachineSpec``, the synthesis parameters its attributes set, and
the clip's own random generator; ``CHARACTERS`` maps each spec's ``character`` to its function.

Anomalies (test clips only; one kind per clip, with a severity drawn uniformly in [0.05, 1] that scales
its level in dB or its extent linearly, so the mildest are inaudible): harmonic: bearing-fault impulses,
added half-order harmonics, extra amplitude modulation, rubbing (band-limited noise bursts); impulsive:
leak whistle while closed, seat bounce, lower and longer closing resonance, irregular and skipped
strokes; flow: imbalance (1x tone and modulation), blade damage (per-revolution harmonics), bearing
impulses, clogging (steeper spectrum), rubbing.
"""

from __future__ import annotations

import numpy as np

from kit.synth.machines import VALVE_PATTERNS, MachineSpec
from kit.synth.signals import (
    SAMPLE_RATE,
    bearing_impulses,
    bursts,
    convolve,
    db,
    events,
    modes,
    shaped_noise,
    smooth_random,
    unit_rms,
    wavetable,
)


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
    phase = np.cumsum(f0 * (1.0 + p["wander"] * smooth_random(rng, n, 0.7))) / SAMPLE_RATE
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
    tone = wavetable(phase, 10.0 ** (level_db / 20.0), rng)
    am_depth = max(0.0, p["am_depth"] + p["am_per_load"] * load) * rng.uniform(0.85, 1.15)
    am_rate = p["am_per_f0"] * f0 * (1.0 + 0.15 * load) * rng.uniform(0.95, 1.05)
    t = np.arange(n) / SAMPLE_RATE
    modulation = 1.0 + am_depth * np.sin(2 * np.pi * am_rate * t + 2 * np.pi * rng.random())
    if anomaly == "modulation":  # a second, faster modulation (looseness, eccentricity)
        depth = _severity_level(spec, anomaly, severity)
        modulation = modulation * (1.0 + depth * np.sin(2 * np.pi * f0 * rng.uniform(0.1, 0.2) * t))
    hiss = shaped_noise(rng, n, (100.0, 1000.0, 4000.0, 8000.0), (-20.0, 0.0, -3.0, -15.0))
    signal = unit_rms(unit_rms(tone) * modulation + db(p["hiss_db"]) * hiss)
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
    open_kernel = modes([open_hz, open_hz * 2.3, 5200.0], [0.006, 0.004, 0.002], [1.0, 0.6, 0.3])
    close_kernel = modes(
        [close_hz, close_hz * 1.9, close_hz * 2.7], [close_decay, 0.006, 0.003], [1.6, 0.9, 0.5]
    )
    # scale the clicks by the energy the planned strokes would have, so skipped or added strokes change it
    planned = ((times >= 0.0) & (times < n / SAMPLE_RATE)).sum(axis=(0, 1))  # (opens, closes) in the clip
    energy = planned[0] * np.sum(open_kernel**2) + planned[1] * np.sum(close_kernel**2)
    click_gain = 1.0 / np.sqrt(max(float(energy), 1e-12) / n)
    clicks = convolve(events(n, opens, open_gain), open_kernel) + convolve(
        events(n, closes, close_gain), close_kernel
    )
    if anomaly == "bounce":  # the closing member bounces once on its seat
        bounce = events(n, closes + rng.uniform(0.015, 0.04), close_gain)
        clicks = clicks + db(_severity_level(spec, anomaly, severity)) * convolve(bounce, close_kernel)
    # flow hiss while the valve is open: +1 at each opening, -1 at each closing, summed over time
    edges = np.zeros(n + 1, dtype=np.float32)
    starts = np.clip(np.round(opens * SAMPLE_RATE), 0, n).astype(np.int64)
    np.add.at(edges, starts, 1.0)
    np.add.at(edges, np.maximum(np.clip(np.round(closes * SAMPLE_RATE), 0, n).astype(np.int64), starts), -1.0)
    gate = convolve(np.clip(np.cumsum(edges)[:n], 0.0, 1.0), np.hanning(160).astype(np.float32) / 80.0)
    hiss = shaped_noise(rng, n, (500.0, 1500.0, 5000.0, 8000.0), (-25.0, 0.0, -2.0, -12.0))
    hiss_gain = db(p["hiss_db"] + rng.uniform(-1.0, 1.0))
    hum_phase = np.arange(n) * (100.0 * rng.uniform(0.995, 1.005) / SAMPLE_RATE)
    hum = wavetable(hum_phase, 0.5 ** np.arange(8), rng)
    signal = click_gain * clicks + hiss_gain * hiss * gate + db(p["hum_db"]) * unit_rms(hum)
    if anomaly == "leak":  # a thin, high whistle through the closed valve
        leak = shaped_noise(rng, n, (2000.0, 4000.0, 6000.0, 8000.0), (-30.0, 0.0, 0.0, -20.0))
        signal = signal + db(_severity_level(spec, anomaly, severity)) * leak * (1.0 - 0.7 * gate)
    return signal


def _flow_machine(
    spec: MachineSpec, p: dict[str, float], n: int, rng: np.random.Generator, anomaly: str, severity: float
) -> np.ndarray:
    """Fan/blower: turbulent broadband noise plus blade-pass tones on a slowly wandering rotation."""
    f_rot = p["f_rot"] * (1.0 + rng.uniform(-0.01, 0.01))
    phase = np.cumsum(f_rot * (1.0 + p["wander"] * smooth_random(rng, n, 0.5))) / SAMPLE_RATE
    corner = p["corner_hz"] * rng.uniform(0.9, 1.1)
    slope = p["slope_db_oct"] + rng.normal(0.0, 0.2)
    if anomaly == "clogging":  # obstructed flow: the spectrum above the corner gets steeper
        slope -= _severity_level(spec, anomaly, severity)
    corners = np.array([50.0, corner, corner * 4, corner * 16])
    noise = shaped_noise(rng, n, corners, (-6.0, 0.0, 2 * slope, 4 * slope))
    turbulence = 1.0 + p["turbulence"] * smooth_random(rng, n, 2.0)
    harmonic = np.arange(1, int(3000.0 / f_rot) + 1)
    blades = int(p["blades"])
    tonal_db = np.where(harmonic % blades == 0, -6.0 * (harmonic // blades - 1), -60.0)
    tonal_db[0] = -20.0
    tonal_db = tonal_db + rng.normal(0.0, 0.5, len(harmonic))
    tone = unit_rms(wavetable(phase, 10.0 ** (tonal_db / 20.0), rng))
    if anomaly == "blade":  # a damaged blade: every revolution differs, harmonics between blade passes
        tone = tone + db(_severity_level(spec, anomaly, severity) - p["bpf_db"]) * unit_rms(
            wavetable(phase, np.where(harmonic % blades == 0, 0.0, 1.0 / harmonic), rng)
        )
    signal = unit_rms(noise * turbulence + db(p["bpf_db"]) * tone)
    if anomaly == "imbalance":  # a once-per-revolution tone and swish
        level = db(_severity_level(spec, anomaly, severity))
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
        return db(_severity_level(spec, anomaly, severity)) * bearing_impulses(rng, n, rotation_hz)
    if anomaly == "subharmonic":  # half-order harmonics: looseness
        orders = np.arange(1, 13)
        half_orders = np.where(orders % 2 == 1, 1.0 / orders, 0.0)
        return db(_severity_level(spec, anomaly, severity)) * unit_rms(wavetable(phase / 2, half_orders, rng))
    if anomaly == "rubbing":
        centre = rng.uniform(1000.0, 3000.0)
        burst = bursts(rng, n, rotation_hz / rng.uniform(2.0, 6.0), (centre / 1.5, centre * 1.5))
        return db(_severity_level(spec, anomaly, severity)) * burst
    return 0.0


CHARACTERS = {"harmonic": _harmonic_machine, "impulsive": _impulsive_machine, "flow": _flow_machine}
