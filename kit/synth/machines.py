"""The synthetic machine types of ``kit.synth``: what each one is, before any sound is made.

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

Each ``MachineSpec`` names its character (the sound model of ``kit.synth.sounds``), its attributes
(label values per domain: the target domain's are never seen in the source domain), its anomaly kinds
and their levels, and its channel levels (machine-to-noise at the near microphone, the machine at the
far microphone against the near one; used by ``kit.synth.render``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
