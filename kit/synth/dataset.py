"""Writing the synthetic dataset (``kit.synth``): clips, tables, its record; ``python -m kit.synth ROOT``.

``generate(root)`` writes every planned clip (16-bit WAV: stereo near/far for the ``2026`` layout, the
near channel alone for ``mono``) in worker processes, then the tables: ``attributes_00.csv`` per
machine, the evaluation ground truth in the organisers' evaluator layout
(``eval_ground_truth/ground_truth_{data,domain,attributes}/``), ``synth_clips.csv`` (each clip's domain,
attributes, anomaly kind and severity) and ``synth_dataset.json`` (the parameters and a summary). Every
file is written atomically, so an interrupted run resumes where it stopped, and a finished dataset with
the same parameters is not written again.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from kit.files import atomic_path, start_dataset, write_text_atomic
from kit.synth.machines import MACHINES
from kit.synth.plan import ClipPlan, check_scale, clip_counts, plan_machine
from kit.synth.render import render_clip
from kit.synth.signals import SAMPLE_RATE

GENERATOR_VERSION = 2
LAYOUTS = ("2026", "mono")
RECORD_NAME = "synth_dataset.json"
LEGACY_RECORD_NAME = "synth_manifest.json"  # its name before kit 2026-12
_FOLDERS = ("dev_data", "eval_data", "eval_ground_truth")  # what a dataset root holds
CLIPS_CSV_NAME = "synth_clips.csv"


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
    """Write the synthetic dataset under ``root`` and return its summary (also in ``synth_dataset.json``).

    ``layout="2026"`` writes stereo near/far clips; ``"mono"`` the 2023-style mono clips (near channel).
    ``machines`` picks a subset of ``MACHINES`` (default: all). ``workers`` processes write clips in
    parallel (default: the CPU count, at most 4); the files are the same for any number of workers.
    A finished dataset with the same parameters is not written again; an interrupted one is completed.
    """
    check_scale(scale)
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

    finished = start_dataset(root, RECORD_NAME, "kit.synth", _FOLDERS, parameters, LEGACY_RECORD_NAME)
    if finished is not None:
        return finished

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
    write_text_atomic(root / RECORD_NAME, text)
    return json.loads(text)


def main(argv: list[str] | None = None, prog: str = "python -m kit.synth") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write the embedded DCASE-2026-style dataset: deterministic synthetic machine sounds "
        "with a real detection problem (official layout, near/far stereo).",
    )
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
