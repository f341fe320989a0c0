"""The training benchmark: every recipe's fine-tuning setting, a few real optimiser steps each.

    python -m kit.tools.bench train [--recipes audiocc_1 eat_asp_1 ...] [--notebooks 05_finetune_efficientat]
                                    [--steps 5] [--batch B] [--workers N] [--device cpu|cuda]
                                    [--precision auto]

For each distinct training setting of the recipes (``kit.pipeline.effective_settings``: the
backbone, batch, grad accumulation, crop length and mode, full or LoRA, the augmentations) and of the
fine-tuning notebooks' own defaults (``--notebooks``: EfficientAT's 05, which no recipe runs yet), at
each benchmarked release size (``BENCHED``; the sizes come from the backbone modules' ``RELEASES``:
EfficientAT at mn04 and mn10) with random weights, ``kit.train.train`` itself runs ``--steps`` optimiser
steps on generated 16-s stereo clips in the official layout, in a fresh process (so its peak memory is
its own). The table gives steps/s and clips/s (from the steps after the first, whose time includes
the loader's start and the allocator's warm-up), the peak memory (GPU: peak allocated; CPU: peak
resident set of the process), the precision and gradient checkpointing the policy chose
(``kit.precision``), and the clips/s of that setting's training loader alone (no model).

``--batch`` replaces every setting's batch size (the table says so): a release-size step of batch 16
at 16 s takes minutes on a CPU, so a CPU run is a check of the tool and of the relative costs, not a
forecast of GPU times.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from kit import data, models, pipeline, train
from kit import precision as precision_policy

DEFAULT_RECIPES = (
    "audiocc_1",
    "audiocc_2",
    "audiocc_3",
    "audiocc_4",
    "eat_asp_1",
    "eat_asp_2",
    "eat_asp_3",
    "eat_asp_4",
    "default",
)
# Fine-tuning notebooks whose own training setting is benchmarked beside the recipes' (no recipe
# trains EfficientAT yet).
DEFAULT_NOTEBOOKS = ("05_finetune_efficientat",)
# The releases benchmarked, by backbone; each backbone module's RELEASES table gives their random-init
# configuration (BEATs iter3, EAT-base, FISHER-small, EfficientAT mn04 and mn10). The CNN trains from
# scratch, so its own config is already its real size.
BENCHED = {
    "beats": ("BEATs_iter3",),
    "eat": ("EAT-base",),
    "fisher": ("FISHER-small",),
    "efficientat": ("mn04_as", "mn10_as"),
    "nabeats": ("dcase2026_nabeats_seed0",),
}
# The settings that decide a step's cost; recipes that agree on all of them share one row.
COST_FIELDS = (
    "backbone",
    "backbone_options",
    "mode",
    "lora_rank",
    "batch_size",
    "grad_accum",
    "length_mode",
    "crop_seconds",
    "channels",
    "spec_augment",
    "mixup_alpha",
    "noise_mix_prob",
)
CLIP_SECONDS = 16.0  # the longest crop of any recipe; shorter crops are cut from these clips


def release_configs(backbone: str) -> list[str | None]:
    """The random-init configurations of ``backbone``'s benchmarked releases, read from its module's
    ``RELEASES``; ``[None]`` (the setting's own configuration) for a backbone without releases."""
    if backbone not in BENCHED:
        return [None]
    module = importlib.import_module(f"kit.backbones.{backbone}")
    sizes = getattr(module, "RELEASE_SIZES", module.RELEASES)  # nabeats' RELEASES give URLs, its sizes apart
    return [sizes[release]["config"] for release in BENCHED[backbone]]


def notebook_setting(notebook: str) -> dict:
    """The TrainConfig dict of a fine-tuning notebook's own parameter defaults (name, training)."""
    params = pipeline.notebook_parameters(notebook)
    backbone = pipeline.notebook_backbone(notebook)
    if backbone is None or "training" not in params:
        raise ValueError(
            f"{notebook} is not a fine-tuning notebook (no backbone in its name, or no training)"
        )
    values = {**(params["training"] or {}), "name": params["name"], "backbone": backbone, "checkpoint": None}
    return train.TrainConfig.from_dict(values).to_dict()


def training_settings(recipes: list[str], notebooks: list[str] = ()) -> list[dict]:
    """``[{"recipes": [...], "training": TrainConfig dict}]``: the distinct fine-tuning settings of
    ``recipes`` and of ``notebooks``' own defaults, in the order met, each with the recipes (and
    branch names) that train it (``05:efficientat`` for a notebook's default)."""
    labelled = [
        (f"{recipe}:{step['params']['training']['name']}", step["params"]["training"])
        for recipe in recipes
        for step in pipeline.effective_settings(recipe)
        if isinstance(step["params"].get("training"), dict) and "backbone" in step["params"]["training"]
    ]
    for notebook in notebooks:
        training = notebook_setting(notebook)
        labelled.append((f"{notebook[:2]}:{training['name']}", training))
    rows: dict[str, dict] = {}
    for label, training in labelled:
        key = json.dumps({f: training[f] for f in COST_FIELDS}, sort_keys=True, default=str)
        row = rows.setdefault(key, {"recipes": [], "training": training})
        if label not in row["recipes"]:
            row["recipes"].append(label)
    return list(rows.values())


def write_training_set(root: str | Path, clips_per_class: int = 4, seconds: float = CLIP_SECONDS) -> Path:
    """A small development set in the official layout: two machine types x two attribute values,
    stereo 16-bit 16-kHz clips (a harmonic tone per class on the near channel, more noise on the far)."""
    root = Path(root)
    rng = np.random.default_rng(0)
    n = round(seconds * data.SAMPLE_RATE)
    t = np.arange(n) / data.SAMPLE_RATE
    classes = {
        ("fan", "spd_1"): 180.0,
        ("fan", "spd_2"): 260.0,
        ("valve", "pat_A"): 90.0,
        ("valve", "pat_B"): 140.0,
    }
    for c, ((machine, attribute), f0) in enumerate(classes.items()):
        folder = root / "dev_data" / "raw" / machine / "train"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_class):
            tone = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) for k in (1, 2, 3))
            near = tone + 0.02 * rng.standard_normal(n)
            far = 0.3 * tone + 0.1 * rng.standard_normal(n)
            number = c % 2 * clips_per_class + i
            name = f"section_00_source_train_normal_{number:04d}_{attribute}.wav"
            sf.write(
                folder / name, np.stack([near, far], 1).astype(np.float32), data.SAMPLE_RATE, subtype="PCM_16"
            )
    return root


def bench_config(training: dict, args, config: str | None = None) -> train.TrainConfig:
    """The setting at release size (``config``, else the setting's own configuration) with random
    weights, ``args.steps`` steps, no checkpoints."""
    values = dict(training)
    backbone = values["backbone"]
    values.update(
        name=f"bench_{backbone}",
        checkpoint=None,
        backbone_config=config or values.get("backbone_config"),
        steps=args.steps,
        warmup_steps=1,
        checkpoint_every=None,
        checkpoint_minutes=10**6,
        keep_checkpoint=False,
        allow_cpu=True,
        device=args.device,
        precision=args.precision,
        seed=0,
    )
    if args.batch:
        values["batch_size"] = args.batch
    if args.workers is not None:
        values["num_workers"] = args.workers
    return train.TrainConfig.from_dict(values)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_loader(index: pd.DataFrame, cfg: train.TrainConfig, batches: int) -> float:
    """Clips/s of the setting's training loader alone: ``batches`` micro-batches, no model."""
    items = train.training_items(index, cfg)
    codes, _ = data.make_labels(items, cfg.label_scheme)
    place = train._place(cfg)
    noise = train._noise_sources(items, cfg)
    loader = iter(train._loader(items, codes, noise, cfg, place, 0))
    next(loader)  # workers started
    start, clips = time.perf_counter(), 0
    for _ in range(min(batches, cfg.steps * cfg.grad_accum - 1)):
        clips += len(next(loader)[0])
    return clips / max(time.perf_counter() - start, 1e-9)


def measure_training(training: dict, args, data_root: Path) -> dict:
    """Run the setting for ``args.steps`` steps in this process; its speed, memory and precision."""
    cfg = bench_config(training, args, getattr(args, "config", None))
    index = data.build_index(data_root, progress=False)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prec = precision_policy.resolve(cfg.precision, device)
    with tempfile.TemporaryDirectory(prefix="kit-bench-train-") as run_dir:
        out = train.train(index, cfg, run_dir, progress=False)
        history = pd.read_csv(out / "history.csv")
        embedder = models.load_embedder(out)
    seconds = history["seconds"].to_numpy()
    timed = seconds[1:] if len(seconds) > 1 else seconds
    step_s = statistics.mean(timed)
    clips_per_step = cfg.batch_size * cfg.grad_accum
    checkpointing = precision_policy.use_gradient_checkpointing(
        cfg.gradient_checkpointing,
        prec.facts,
        parameters=models.count_parameters(embedder.backbone),
        crop_seconds=cfg.crop_seconds,
    )
    return {
        "backbone": cfg.backbone,
        "config": cfg.backbone_config,
        "params_m": models.count_parameters(embedder.backbone) / 1e6,
        "mode": cfg.mode if cfg.mode != "lora" else f"lora r{cfg.lora_rank}",
        "batch": clips_per_step,
        "crop": f"{cfg.crop_seconds:g} s {cfg.length_mode}",
        "device": device.type,
        "precision": prec.mode + (" tf32" if prec.tf32 else ""),
        "checkpointing": "on" if checkpointing else "off",
        "steps_per_s": 1.0 / step_s,
        "clips_per_s": clips_per_step / step_s,
        "peak_mb": _peak_mb(device),
        "loader_clips_per_s": measure_loader(index, cfg, args.loader_batches),
        "workers": data.default_workers() if cfg.num_workers is None else cfg.num_workers,
    }


def _command_line(args, setting: dict, data_root: Path, config: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "kit.tools.bench", "_train", json.dumps(setting["training"], default=str)]
    if config:
        cmd += ["--config", config]
    cmd += ["--data-root", str(data_root), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--precision", args.precision, "--loader-batches", str(args.loader_batches)]
    if args.device:
        cmd += ["--device", args.device]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    return cmd


def train_table(args) -> list[dict]:
    settings = training_settings(args.recipes, args.notebooks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kit-bench-train-data-") as folder:
        data_root = write_training_set(folder)
        for setting in settings:
            for config in release_configs(setting["training"]["backbone"]):
                command = _command_line(args, setting, data_root, config)
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(
                        f"training benchmark of {setting['recipes']} failed:\n{done.stderr[-3000:]}"
                    )
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["recipes"] = ", ".join(setting["recipes"])
                rows.append(row)
    return rows


def print_train_table(rows: list[dict], args) -> None:
    batch_note = f"; batch replaced by {args.batch}" if args.batch else ""
    print(
        f"\ntraining at release size, random weights, {args.steps} steps per setting (first one untimed)"
        f"{batch_note}; loader: clips/s of the training loader alone"
    )
    header = (
        f"{'backbone':11s} {'config':7s} {'params':>7s} {'mode':9s} {'batch':>5s} {'crop':16s} {'device':6s} "
        f"{'precision':10s} {'ckpt':4s} {'steps/s':>8s} {'clips/s':>8s} {'peak MB':>8s} "
        f"{'loader/s':>8s} {'workers':>7s}  recipes"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['backbone']:11s} {str(r['config']):7s} {r['params_m']:6.1f}M {r['mode']:9s} {r['batch']:5d} "
            f"{r['crop']:16s} "
            f"{r['device']:6s} {r['precision']:10s} {r['checkpointing']:4s} {r['steps_per_s']:8.3f} "
            f"{r['clips_per_s']:8.2f} {r['peak_mb']:8.0f} {r['loader_clips_per_s']:8.1f} {r['workers']:7d}  "
            f"{r['recipes']}"
        )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipes", nargs="*", default=list(DEFAULT_RECIPES), help="recipes to read (names or YAML paths)"
    )
    parser.add_argument(
        "--notebooks",
        nargs="*",
        default=list(DEFAULT_NOTEBOOKS),
        help="fine-tuning notebooks whose own training setting is benchmarked too (none: --notebooks alone)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="optimiser steps per setting (the first untimed)"
    )
    parser.add_argument("--batch", type=int, default=None, help="replace every setting's batch size")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the setting's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--precision", default="auto", choices=precision_policy.PRECISIONS)
    parser.add_argument("--loader-batches", type=int, default=8, help="micro-batches timed for the loader")


def add_isolated_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("training", help="the TrainConfig mapping, as JSON")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--config", default=None, help="the release-size configuration to build")
    add_train_arguments(parser)


def run_train(args) -> int:
    try:
        training_settings(args.recipes, args.notebooks)  # a recipe that does not exist is named first
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_train_table(train_table(args), args)
    return 0


def run_train_one(args) -> int:
    print(json.dumps(measure_training(json.loads(args.training), args, args.data_root)))
    return 0
