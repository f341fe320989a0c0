"""Embedded DCASE-2026-style dataset: deterministic synthetic machine sounds with a real detection problem.

``generate(root)`` (or ``python -m kit.synth ROOT``, ``dcase-kit synth ROOT``) writes a small dataset in
the official layout: ``dev_data/raw/<machine>/{train,test}`` with ``attributes_00.csv``,
``eval_data/raw/<machine>/{train,test}`` with hidden test names (``section_00_0000.wav`` ...), and the
evaluation ground truth in the organisers' evaluator layout
(``eval_ground_truth/ground_truth_{data,domain,attributes}/``), so every stage of the toolkit runs end to
end without downloads.

The parts, each one concern, read in this order (each imports only the ones above it):

- ``machines``: the machine types (``MACHINES``): clip length, attributes per domain, anomaly kinds and
  levels, channel levels.
- ``signals``: signal building blocks (shaped noise, smooth random curves, wavetables, impulse trains,
  resonant modes).
- ``sounds``: the sound model of each machine character (harmonic, impulsive, flow) and its faults.
- ``plan``: which clips a machine gets, their names and their seeds (``plan_machine``, ``clip_counts``).
- ``render``: one clip's near and far channels: environment noise, noise paths, rooms, levels
  (``render_clip``).
- ``dataset``: writing the clips, the tables and the dataset record (``generate``); the command line.

Domains: the target domain uses attribute values (or hidden speeds) never seen in the source domain,
another background (source: babble and mains hum dominate; target: traffic rumble and factory clanks)
and another room for the far microphone (RT60 0.4 s vs 0.65 s). Every clip also draws nuisance
variation: speed (+-1.5 %), level (+-0.7 dB), tilt, modulation, click modes, noise mix and level.

Sizes at ``scale=1.0``: 450 clips, 72 min of audio, 276 MB (per machine 40 source + 10 target training
clips and 10 test clips per (source|target) x (normal|anomaly) cell; ``kit.synth.plan``). The files do
not depend on the order or the number of worker processes.
Calibration (``python -m kit.tools.synth_check ROOT``): a log-mel-statistics 1-NN detector scores an
official hmean of 0.59 to 0.70 on the near channel (seeds 0 to 2), 0.79 to 0.84 on the clean machine
signal and 0.50 to 0.55 on the far channel, lower in the target domain than in the source; the
cancellers of ``kit.denoise`` close part of the gap between near and clean (the leakage-aware ``wl``
most: 0.70 to 0.72), the whole-clip gain ``w1`` least where the far microphone hears the machine
strongly.
"""

from kit.synth.dataset import (
    CLIPS_CSV_NAME,
    GENERATOR_VERSION,
    LAYOUTS,
    LEGACY_RECORD_NAME,
    RECORD_NAME,
    generate,
    main,
)
from kit.synth.machines import MACHINES, VALVE_PATTERNS, Attribute, MachineSpec
from kit.synth.plan import (
    DOMAINS,
    LABELS,
    SEVERITY_RANGE,
    SOURCE_TRAIN_CLIPS,
    SPLITS,
    TARGET_TRAIN_CLIPS,
    TEST_CLIPS_PER_CELL,
    ClipPlan,
    clip_counts,
    plan_machine,
)
from kit.synth.render import (
    BACKGROUND_WEIGHTS,
    FAR_NOISE_GAIN_DB,
    INDEPENDENT_NOISE_DB,
    NOISE_KINDS,
    NOISE_PATH_DELAY_S,
    NOISE_PATH_RT60_S,
    NOISE_TAIL_GAIN,
    OUTPUT_GAIN,
    ROOM_RT60,
    RenderedClip,
    noise_path,
    render_clip,
    room_response,
)
from kit.synth.signals import SAMPLE_RATE
from kit.synth.sounds import CHARACTERS

__all__ = [
    "BACKGROUND_WEIGHTS",
    "CHARACTERS",
    "CLIPS_CSV_NAME",
    "DOMAINS",
    "FAR_NOISE_GAIN_DB",
    "GENERATOR_VERSION",
    "INDEPENDENT_NOISE_DB",
    "LABELS",
    "LAYOUTS",
    "MACHINES",
    "LEGACY_RECORD_NAME",
    "RECORD_NAME",
    "NOISE_KINDS",
    "NOISE_PATH_DELAY_S",
    "NOISE_PATH_RT60_S",
    "NOISE_TAIL_GAIN",
    "OUTPUT_GAIN",
    "ROOM_RT60",
    "SAMPLE_RATE",
    "SEVERITY_RANGE",
    "SOURCE_TRAIN_CLIPS",
    "SPLITS",
    "TARGET_TRAIN_CLIPS",
    "TEST_CLIPS_PER_CELL",
    "VALVE_PATTERNS",
    "Attribute",
    "ClipPlan",
    "MachineSpec",
    "RenderedClip",
    "clip_counts",
    "generate",
    "main",
    "noise_path",
    "plan_machine",
    "render_clip",
    "room_response",
]
