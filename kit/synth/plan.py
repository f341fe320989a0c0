"""Which clips a synthetic machine gets and the names they are written under (``kit.synth``).

Sizes at ``scale=1.0``: per machine 40 source + 10 target training clips (the source count scales, the
10 target clips do not) and a balanced test set of 10 clips per (source|target) x (normal|anomaly)
cell (scaled). Attribute values cycle through their combinations, so every cell is balanced. Every
clip comes from its own RNG seeded by (seed, machine, split, domain, label, index) (``clip_seeds``:
one sequence for its plan, one for its audio), so the files do not depend on the order or the number
of worker processes. Evaluation test clips get hidden names (``section_00_0000.wav`` ...) in a seeded
random order; the development-style name stays in ``ClipPlan.official_name``.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from dataclasses import dataclass

import numpy as np

from kit.synth.machines import MACHINES, MachineSpec

SOURCE_TRAIN_CLIPS = 40  # at scale 1.0
TARGET_TRAIN_CLIPS = 10  # per section, never scaled (as in the real data)
TEST_CLIPS_PER_CELL = 10  # per (domain, label) cell at scale 1.0
SEVERITY_RANGE = (0.05, 1.0)

SPLITS = ("train", "test")
DOMAINS = ("source", "target")
LABELS = ("normal", "anomaly")


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


def clip_seeds(seed: int, machine: str, split: str, domain: str, label: str, index: int) -> list:
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


def check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def clip_counts(scale: float) -> dict[str, int]:
    """Clips per machine at ``scale``: source and target training clips, test clips per cell."""
    check_scale(scale)
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
        rng = np.random.default_rng(clip_seeds(seed, spec.name, split, domain, label, index)[0])
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
