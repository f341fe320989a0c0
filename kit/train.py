"""Fine-tune a pretrained backbone into a machine-sound embedder with a proxy classification task.

The method of both seed reports: backbone -> pooling head -> low-dimensional embedding, trained with an
angular-margin loss (ArcFace and variants) to classify normal training clips by a label scheme
(section, attributes, or the EAT-ASP composite label machine+section+attributes+domain+channel).

What the loop offers:
- fine-tuning modes: ``full``, ``partial`` (only the last ``train_last_n`` blocks), ``lora`` (peft
  adapters on the attention projections), ``frozen`` (head only);
- AdamW with linear warm-up and cosine decay counted in optimiser steps; gradient accumulation;
  a sampler that balances machine types; SpecAugment, random crops vs zero-padding, mixup, and
  noise-aware mixing with far-channel audio of other clips; bf16 autocast on GPU;
- determinism and resume: every random draw of step ``s`` comes from generators seeded by
  ``(seed, s, rank)``, so a run resumed from its last checkpoint ends with the same weights as an
  uninterrupted one;
- DistributedDataParallel under ``torchrun`` (NCCL on GPU, gloo on CPU), each rank drawing its own
  balanced batch.

Outputs under ``<run_dir>/<name>/``: ``config.yaml``, ``checkpoints/last.pt`` (resume state),
``model.pt`` (final trainable weights + buffers), ``lora_adapters.safetensors`` (LoRA only),
``history.csv`` and ``training_curves.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from kit import data, losses, manifest, precision, pseudolabels
from kit.augment import SpecAugment, mixup, noise_mix
from kit.files import atomic_path, write_text_atomic
from kit.lora import save_adapters
from kit.models import (
    MODES,
    Embedder,
    ModelConfig,
    build_embedder,
    count_parameters,
    file_fingerprint,
    load_trainable_state,
    read_model,
    trainable_state,
)


@dataclass
class TrainConfig(ModelConfig):
    """Every setting of a fine-tuning run: the training notebooks (02-07) pass their ``training``
    mapping through ``from_dict``, so every field can be set from a recipe or
    ``--set 02.training.FIELD=VALUE``. It extends ``kit.models.ModelConfig`` (backbone, checkpoint,
    head, mode, LoRA, ...: the model it trains, :attr:`model`) with how to train it.

    The defaults are the one set of defaults of the toolkit: the embedded CPU run (small random-init
    backbones, 300 steps of 5-s crops). The report recipes in ``notebooks/recipes/`` set their own
    values for everything that differs."""

    name: str = "beats"
    loss: str = "arcface"  # arcface | subcenter | adacos | subcluster_adacos
    loss_s: float = 30.0
    loss_m: float = 0.3
    subcenters: int = 3  # weight vectors per class: subcenter (3) and subcluster_adacos (16 published)
    label_scheme: str = "attribute"  # section | attribute | composite (+ domain + near/far channel)
    # | pseudo (KMeans pseudo-labels for every machine) | attribute_pseudo (attributes + domain where a
    # machine has attributes, pseudo-labels where it has none): kit.pseudolabels, saved in the run
    pseudo_k_source: int = 7  # KMeans clusters of a machine's source clips (per section)
    pseudo_k_target: int = 1  # ... and of its target clips
    pseudo_seed: int = 42
    pseudo_features: str = "backbone"  # the frozen pretrained backbone (log-mel without one) | logmel
    channels: tuple[str, ...] = ("near", "far")  # one item per (clip, channel); cancellers too (w1, ss, ...)
    canceller_settings: dict = field(default_factory=dict)  # canceller name -> its settings (kit.denoise)
    mono_fallback: bool = False  # on mono data, leave out channels that need the far microphone
    train_datasets: tuple[str, ...] = ("dev", "eval")
    length_mode: str = "random_crop"  # or "pad_or_cut" (the EAT-ASP seed pads to 16 s)
    crop_seconds: float = 5.0
    mask_padding: bool = True  # False: zero padding is input the model sees (EAT-ASP's 16-s padding)
    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4  # 1e-3 collapses the random-init CPU transformers (mean cosine 0.995-1.0 between clips)
    head_lr_scale: float = 10.0  # lr of the freshly initialised head and loss = lr * head_lr_scale
    weight_decay: float = 0.01
    grad_clip: float | None = 5.0  # max global gradient norm; None: no clipping
    warmup_steps: int = 30
    spec_augment: bool = True
    mixup_alpha: float = 0.0
    mixup_prob: float = (
        1.0  # with mixup_alpha > 0: the share of batches mixed (kasahart/asd-experiments: 0.5)
    )
    noise_mix_prob: float = 0.0
    noise_mix_snr: tuple[float, float] = (5.0, 20.0)
    balance_machines: bool = True
    precision: str = (
        "auto"  # auto | bf16 | fp16 | fp32 (kit.precision: bf16 on 8.0+ GPUs, fp16 + scaler on 7.x)
    )
    seed: int = 0
    checkpoint_minutes: float = (
        10.0  # a full checkpoint (weights + optimiser) at most this often, and at the end
    )
    checkpoint_every: int | None = None  # also every this many steps (tests; None: by time only)
    keep_checkpoint: bool = False  # keep checkpoints/last.pt once model.pt is written (to extend the run)
    num_workers: int | None = None  # loader processes; None: one per core but one, at most 8
    pin_memory: bool | None = None  # None: on when training on a GPU
    persistent_workers: bool = True
    prefetch_factor: int = 2
    device: str | None = None
    allow_cpu: bool = False  # train a release-size backbone on a CPU anyway (days, not hours)

    # Settings that change how a run is executed, not what it computes: a run resumes across them.
    EXECUTION_FIELDS = (
        "checkpoint_minutes",
        "checkpoint_every",
        "keep_checkpoint",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "prefetch_factor",
        "device",
        "allow_cpu",
    )

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def differences(self, other: dict) -> list[str]:
        """The settings (other than ``EXECUTION_FIELDS``) whose values differ from a saved config."""
        mine, other = self.to_dict(), _current_names(other)
        keys = sorted((set(mine) | set(other)) - set(self.EXECUTION_FIELDS))
        # A setting added after the saved run was made counts as its default there.
        defaults = type(self)().to_dict()
        return [key for key in keys if mine.get(key, defaults.get(key)) != other.get(key, defaults.get(key))]

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A validated config from a mapping of field -> value; an unknown field is an error that
        lists the valid ones (a typo in a recipe must not be ignored)."""
        if not isinstance(values, dict):
            raise ValueError(f"training settings must be a mapping of TrainConfig fields, got {values!r}")
        unknown = sorted(set(values) - set(cls.fields()) - {"amp", "front_end_settings"})
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; valid settings: {sorted(cls.fields())}")
        values = dict(values)
        for key in ("channels", "train_datasets", "noise_mix_snr"):
            if key in values and values[key] is not None:
                values[key] = (values[key],) if isinstance(values[key], str) else tuple(values[key])
        if values.get("backbone_options") is None:
            values.pop("backbone_options", None)
        values = _current_names(values)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {self.mode!r}: expected one of {MODES}")
        bad = [c for c in self.channels if c not in data.channel_names()]
        if bad or not self.channels:
            raise ValueError(
                f"channels must be a non-empty list of {data.channel_names()}, got {self.channels}"
            )
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("steps, batch_size and grad_accum must be positive")
        if self.label_scheme not in data.LABEL_SCHEMES:
            raise ValueError(
                f"unknown label scheme {self.label_scheme!r}: expected one of {sorted(data.LABEL_SCHEMES)}"
            )
        pseudolabels.check_settings(
            self.pseudo_k_source, self.pseudo_k_target, self.pseudo_seed, self.pseudo_features
        )
        if self.length_mode not in data.LENGTH_MODES:
            raise ValueError(f"unknown length mode {self.length_mode!r}: expected one of {data.LENGTH_MODES}")
        if not 0 <= self.mixup_prob <= 1:
            raise ValueError(f"mixup_prob must be in [0, 1], got {self.mixup_prob!r}")
        for name in ("lr", "head_lr_scale", "crop_seconds", "checkpoint_minutes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.precision not in precision.PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: expected one of {precision.PRECISIONS}")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ValueError(f"num_workers must be None (from the cores) or >= 0, got {self.num_workers!r}")

    @property
    def model(self) -> ModelConfig:
        """The model these settings train (backbone, checkpoint, head, mode, LoRA, ...)."""
        return ModelConfig.of(self)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("channels", "train_datasets", "noise_mix_snr"):
            out[key] = list(out[key])
        return out


def _current_names(values: dict) -> dict:
    """A config saved by an earlier version in today's names: ``amp`` became ``precision``, the
    cancellers' ``front_end_settings`` became ``canceller_settings``."""
    values = dict(values)
    if "amp" in values and "precision" not in values:
        values["precision"] = "auto" if values.pop("amp") else "fp32"
    if "front_end_settings" in values and "canceller_settings" not in values:
        values["canceller_settings"] = values.pop("front_end_settings")
    return values


def resolve_config(
    training: dict,
    *,
    index: pd.DataFrame | None,
    name: str,
    backbone: str,
    checkpoint: str | None = None,
    require_checkpoint: bool = False,
) -> TrainConfig:
    """The effective TrainConfig of a fine-tuning notebook: its ``training`` mapping (any TrainConfig
    field) over the defaults, with the notebook's name, backbone and checkpoint (the one place a
    notebook's settings become a config; ``kit.pipeline`` shows a recipe's through it too). On a mono
    dataset the training channels default to the near channel alone (asking for ``far`` there stays an
    error); ``index=None`` (no dataset yet) leaves the channels as stated."""
    if not isinstance(training, dict):
        raise ValueError(f"training must be a mapping of TrainConfig fields, got {training!r}")
    fixed = sorted({"name", "backbone", "checkpoint"} & set(training))
    if fixed:
        raise ValueError(f"{fixed} are parameters of the notebook itself, not of its training mapping")
    if require_checkpoint and not checkpoint:
        raise ValueError(
            f"{name}: this recipe needs a pretrained {backbone} checkpoint: set {backbone.upper()}_CHECKPOINT "
            "(a local path, a Hugging Face repo id or a URL) or the notebook's `checkpoint` parameter"
        )
    values = {**training, "name": name, "backbone": backbone, "checkpoint": checkpoint or None}
    cfg = TrainConfig.from_dict(values)
    if index is None:
        return cfg
    fallback = cfg.mono_fallback or "channels" not in training  # the default channels adapt to mono data
    return dataclasses.replace(
        cfg, channels=data.usable_channels(cfg.channels, index, mono_fallback=fallback)
    )


# ----------------------------------------------------------------------------------------------
# Data: one item per (clip, channel); batches are a pure function of (seed, step, rank)


class TrainItems(Dataset):
    """Training examples for the proxy task. A sampler yields ``(item, seed)`` pairs, and the crop
    (and the noise clip, when noise mixing is on) of that item is drawn from ``seed``.

    An item is ``(wave, valid, noise, noise_valid, label)``: ``valid`` counts the samples of ``wave``
    that are audio (a clip shorter than the crop is zero-padded after them), so the backbone masks
    the padding; with ``mask_padding=False`` the padding counts as input (as in the EAT-ASP report). With
    ``reference`` (a backbone that takes a noise reference) it ends with ``reference, reference_valid``:
    the far channel of the same clip, cropped at the same place (drawn from the same seed)."""

    def __init__(
        self,
        items: pd.DataFrame,
        labels: np.ndarray,
        length: data.LengthPolicy,
        noise_paths: list[str],
        mask_padding: bool = True,
        canceller_settings: dict | None = None,
        reference: bool = False,
    ):
        self.canceller_settings = canceller_settings or {}
        self.reference = reference
        self.paths = items["path"].tolist()
        self.channels = items["channel"].tolist()
        self.labels = labels
        self.length = length
        self.noise_paths = noise_paths
        self.mask_padding = mask_padding

    def __len__(self) -> int:
        return len(self.paths)

    def _crop(self, path: str, channel: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        wave, valid = data.read_clip(
            path, channel, self.length, rng, canceller_settings=self.canceller_settings
        )
        return wave, (valid if self.mask_padding else wave.shape[-1])

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        rng = np.random.default_rng(seed)
        wave, valid = self._crop(self.paths[index], self.channels[index], rng)
        noise, noise_valid = np.zeros(0, dtype=np.float32), 0
        if self.noise_paths:
            source = self.noise_paths[int(rng.integers(len(self.noise_paths)))]
            noise, noise_valid = self._crop(source, "far", rng)
        item = (wave, valid, noise, noise_valid, int(self.labels[index]))
        if self.reference:  # a fresh generator of the same seed draws the same crop start
            item += self._crop(self.paths[index], "far", np.random.default_rng(seed))
        return item


def _collate(batch):
    waves, valid, noises, noise_valid, labels, *reference = zip(*batch)
    return (
        data.pad_waves(waves),
        torch.tensor(valid),
        data.pad_waves(noises, min_length=1),
        torch.tensor(noise_valid),
        torch.tensor(labels),
    ) + ((data.pad_waves(reference[0]), torch.tensor(reference[1])) if reference else ())


def _step_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


class StepBatches(Sampler):
    """Yields the micro-batches of steps ``start..steps-1``: each a list of ``(item, crop_seed)``.

    With ``balance`` the machine type is drawn uniformly first, then an item of that machine, so
    machines with more clips do not dominate; draws depend only on (seed, step, rank, micro)."""

    def __init__(
        self,
        groups: np.ndarray,
        batch_size: int,
        steps: int,
        grad_accum: int,
        seed: int,
        rank: int,
        balance: bool,
        start: int = 0,
    ):
        self.batch_size, self.steps, self.grad_accum = batch_size, steps, grad_accum
        self.seed, self.rank, self.balance, self.start = seed, rank, balance, start
        names, inverse = np.unique(groups, return_inverse=True)
        self.members = [np.flatnonzero(inverse == g) for g in range(len(names))]
        self.n_items = len(groups)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.grad_accum

    def batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng(_step_seed(self.seed, step, self.rank, micro))
        if self.balance:
            picks = rng.integers(len(self.members), size=self.batch_size)
            idx = [int(self.members[g][rng.integers(len(self.members[g]))]) for g in picks]
        else:
            idx = rng.integers(self.n_items, size=self.batch_size).tolist()
        seeds = rng.integers(2**31 - 1, size=self.batch_size)
        return [(int(i), int(s)) for i, s in zip(idx, seeds)]

    def __iter__(self):
        for step in range(self.start, self.steps):
            for micro in range(self.grad_accum):
                yield self.batch(step, micro)


def training_items(index: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """The training rows (normal train clips of the chosen datasets), one per requested channel."""
    rows = index[(index["split"] == "train") & index["dataset"].isin(cfg.train_datasets)]
    if rows.empty:
        raise ValueError(f"no training clips in datasets {cfg.train_datasets} of the index")
    channels = data.usable_channels(cfg.channels, rows, mono_fallback=cfg.mono_fallback)
    parts = [rows.assign(channel=c) for c in channels]  # channel-major: the sampler's item numbers
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Optimisation


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class ProxyTask(nn.Module):
    """Embedder + margin loss in one module, so DDP synchronises the class weights too."""

    def __init__(self, embedder: Embedder, loss: nn.Module):
        super().__init__()
        self.embedder = embedder
        self.loss = loss

    def forward(self, waves, lengths, labels, perm=None, lam=1.0, augment=None, **reference):
        emb = self.embedder(waves, lengths, augment=augment, **reference)
        loss = self.loss(emb, labels)
        if perm is not None and lam < 1.0:
            loss = lam * loss + (1 - lam) * self.loss(emb, labels[perm])
        with torch.no_grad():
            acc = (self.loss.logits(emb.detach()).argmax(-1) == labels).float().mean()
        return loss, acc


@dataclass(frozen=True)
class _Place:
    """Where this process trains: the world size, its rank and its device."""

    world: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _place(cfg: TrainConfig) -> _Place:
    """Read ``torchrun``'s environment, pick the device and join the process group when distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return _Place(world, rank, device)


def _refuse_other_settings(cfg: TrainConfig, saved: dict, source: Path) -> None:
    """A checkpoint or model of this run folder must come from the same settings (execution settings
    such as the worker count may differ; a moved pretrained checkpoint with the same content too)."""
    differing = cfg.differences(saved["config"])
    if differing == ["checkpoint"] and saved.get("checkpoint_sha1") is not None:
        if file_fingerprint(cfg.checkpoint) == saved["checkpoint_sha1"]:
            differing = []
    if differing:
        changes = ", ".join(
            f"{k}: {saved['config'].get(k)!r} -> {getattr(cfg, k, None)!r}" for k in differing
        )
        raise ValueError(
            f"{source} was written with other training settings ({changes}); use another name (or run_dir) "
            "for the new settings, or delete that folder to start again"
        )


def train(
    index: pd.DataFrame,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Run (or resume) fine-tuning; returns the output folder ``<run_dir>/<cfg.name>``.

    A finished run (``model.pt`` of the same settings) is not trained again. An interrupted one
    resumes from ``checkpoints/last.pt`` and ends with the same weights as an uninterrupted run.
    ``stop_after`` ends the run after that many steps of this call (checkpoint written), as an
    interruption would. Used by tests and for time-boxed sessions.
    """
    cfg.validate()
    out = Path(run_dir) / cfg.name
    ckpt_path = out / "checkpoints" / "last.pt"
    if (out / "model.pt").exists() and not ckpt_path.exists():
        _refuse_other_settings(cfg, read_model(out / "model.pt"), out / "model.pt")
        return out  # already trained with these settings
    place = _place(cfg)
    prec = precision.resolve(cfg.precision, place.device)

    # --- the model, the proxy task and the optimiser
    torch.manual_seed(cfg.seed)  # same initial head/loss weights on every rank
    random.seed(cfg.seed)
    items = training_items(index, cfg)
    if cfg.label_scheme in data.PSEUDO_SCHEMES:  # <run_dir>/pseudo_labels/<name>.csv: read, or made once
        items = pseudolabels.label_items(items, cfg, run_dir, place=place, progress=progress)
        if place.rank == 0:  # run.yaml: the labels this model trained on, for its branches and the report
            pseudo = pseudolabels.file_path(run_dir, cfg.name)
            manifest.record_model(
                run_dir,
                cfg.name,
                pseudo_labels={**pseudolabels.summary(pseudo), "file": manifest.relative(run_dir, pseudo)},
            )
    codes, classes = data.make_labels(items, cfg.label_scheme)
    embedder = build_embedder(cfg.model)
    checkpointing = precision.use_gradient_checkpointing(
        cfg.gradient_checkpointing,
        prec.facts,
        parameters=count_parameters(embedder.backbone),
        crop_seconds=cfg.crop_seconds,
    )
    embedder.backbone.set_gradient_checkpointing(checkpointing)
    _refuse_release_size_on_cpu(embedder, cfg, place)
    loss = losses.make_loss(cfg.loss, cfg.embed_dim, len(classes), **_loss_kwargs(cfg))
    task = ProxyTask(embedder, loss).to(place.device)
    optimizer, scheduler, trained = _optimiser(task, cfg)
    checkpoint_sha1 = file_fingerprint(cfg.checkpoint)

    # --- resume
    start, history = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _refuse_other_settings(cfg, state, ckpt_path)
        load_trainable_state(task, state["model"], str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        prec.load_state_dict(state.get("precision", {}))
        start, history = state["step"], state["history"]
    if place.rank == 0:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text_atomic(out / "classes.txt", "\n".join(classes) + "\n")
        if progress and start == 0:
            print(f"{cfg.name}: {prec.describe()}; gradient checkpointing {'on' if checkpointing else 'off'}")

    # --- data and the distributed wrapper
    model = task
    if place.distributed:  # layerdrop (BEATs) skips blocks at random: unused parameters are normal
        ids = [place.device.index] if place.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(task, device_ids=ids, find_unused_parameters=True)
    noise_paths = _noise_sources(items, cfg)
    batches = iter(_loader(items, codes, noise_paths, cfg, place, start, embedder.backbone.takes_reference))
    spec = SpecAugment() if cfg.spec_augment else None
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    # --- the loop
    task.train()
    bar = tqdm(total=end - start, desc=f"train {cfg.name}", disable=not progress or place.rank != 0)
    last_save = time.monotonic()
    for step in range(start, end):
        began = time.perf_counter()
        step_loss, step_acc = _train_step(
            model,
            embedder,
            batches,
            step,
            cfg,
            place,
            prec,
            optimizer,
            trained,
            spec,
            bool(noise_paths),
            history,
        )
        scheduler.step()
        history.append(
            {
                "step": step + 1,
                "loss": step_loss,
                "accuracy": step_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - began,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{step_acc:.2f}")
        due = (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == end
        if place.rank == 0 and (due or time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes):
            _save_checkpoint(
                ckpt_path, task, optimizer, scheduler, prec, step + 1, history, cfg, checkpoint_sha1
            )
            last_save = time.monotonic()
    bar.close()
    task.eval()

    if place.rank == 0 and end == cfg.steps:
        _warn_if_collapsed(embedder, items, cfg, place.device)
        _export(out, embedder, history, cfg, checkpoint_sha1)
        if not cfg.keep_checkpoint:
            ckpt_path.unlink(missing_ok=True)  # model.pt holds what extraction needs; the moments go
    if place.distributed:
        dist.barrier()
    return out


def _refuse_release_size_on_cpu(embedder: Embedder, cfg: TrainConfig, place: _Place) -> None:
    size = count_parameters(embedder.backbone)
    if place.device.type == "cpu" and size >= precision.RELEASE_SIZE_PARAMETERS and not cfg.allow_cpu:
        raise RuntimeError(
            f"{cfg.name}: training a {size / 1e6:.0f} M-parameter backbone on a CPU takes days; use a GPU "
            "(on Colab: Runtime > Change runtime type > T4 GPU), or set the training setting allow_cpu: true"
        )


@torch.no_grad()
def _warn_if_collapsed(
    embedder: Embedder, items: pd.DataFrame, cfg: TrainConfig, device, n: int = 32
) -> float:
    """Embed ``n`` training items (fixed crops) with the trained model and warn when they have collapsed
    onto one direction (``kit.embed.collapse_figure``)."""
    from kit import embed

    picks = np.linspace(0, len(items) - 1, min(n, len(items))).astype(int)
    length = data.LengthPolicy(mode=cfg.length_mode, seconds=cfg.crop_seconds, offset="center")
    if length.mode == "random_crop":
        length = data.LengthPolicy(mode="fixed_crop", seconds=cfg.crop_seconds, offset="center")
    clips = [
        data.read_clip(
            items["path"].iloc[i], items["channel"].iloc[i], length, canceller_settings=cfg.canceller_settings
        )
        for i in picks
    ]
    waves = data.pad_waves([wave for wave, _ in clips]).to(device)
    valid = torch.tensor([n for _, n in clips], device=device)
    reference = {}
    if embedder.backbone.takes_reference:  # the far channel of the same clips, cropped alike
        far = [data.read_clip(items["path"].iloc[i], "far", length) for i in picks]
        reference = {
            "reference": data.pad_waves([wave for wave, _ in far]).to(device),
            "reference_lengths": torch.tensor([n for _, n in far], device=device),
        }
    embedder.eval()
    figure = embed.collapse_figure(embedder(waves, valid, **reference).float().cpu().numpy())
    if figure >= embed.COLLAPSE_COSINE:
        warnings.warn(
            f"{cfg.name}: after training, the embeddings of {len(picks)} training clips have collapsed (mean cosine "
            f"similarity {figure:.6f}): KNN cannot rank clips. Try a lower lr (now {cfg.lr:g}), a longer warm-up "
            f"(now {cfg.warmup_steps}) or a smaller head_lr_scale (now {cfg.head_lr_scale:g})",
            stacklevel=3,
        )
    return figure


def _optimiser(task: ProxyTask, cfg: TrainConfig):
    """AdamW over the trainable weights (the fresh head and loss at ``lr * head_lr_scale``), with
    linear warm-up and cosine decay; also the flat list of trained parameters (for clipping)."""
    backbone_params = [p for p in task.embedder.backbone.parameters() if p.requires_grad]
    other_params = [
        p for p in list(task.embedder.head.parameters()) + list(task.loss.parameters()) if p.requires_grad
    ]
    groups = [{"params": other_params, "lr": cfg.lr * cfg.head_lr_scale}]
    if backbone_params:
        groups.insert(0, {"params": backbone_params, "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
    return optimizer, scheduler, backbone_params + other_params


def _noise_sources(items: pd.DataFrame, cfg: TrainConfig) -> list[str]:
    """The stereo clips whose far channel noise mixing draws from (none when it is off)."""
    if cfg.noise_mix_prob <= 0:
        return []
    stereo = items[items["channels"] >= 2]
    if stereo.empty:
        raise ValueError("noise_mix_prob > 0 needs stereo clips (far channel as noise source)")
    return sorted(stereo["path"].unique())


def _loader(
    items, codes, noise_paths, cfg: TrainConfig, place: _Place, start: int, reference: bool = False
) -> DataLoader:
    """The micro-batches of steps ``start..steps-1`` (a pure function of seed, step and rank, so any
    worker count gives the same batches); with ``reference`` each item brings its clip's far channel."""
    if reference:
        mono = items.loc[items["channels"].fillna(2) < 2, "path"]
        if not mono.empty:
            raise data.DatasetError(
                f"{cfg.backbone} takes the far channel as a noise reference, but the training clip "
                f"{mono.iloc[0]} is mono ({mono.nunique()} mono clips): it needs stereo near/far clips"
            )
    dataset = TrainItems(
        items,
        codes,
        data.LengthPolicy(mode=cfg.length_mode, seconds=cfg.crop_seconds),
        noise_paths,
        cfg.mask_padding,
        cfg.canceller_settings,
        reference,
    )
    sampler = StepBatches(
        items["machine"].to_numpy(),
        cfg.batch_size,
        cfg.steps,
        cfg.grad_accum,
        cfg.seed,
        place.rank,
        cfg.balance_machines,
        start=start,
    )
    workers = data.default_workers() if cfg.num_workers is None else cfg.num_workers
    pin = place.device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
    )


def _train_step(
    model,
    embedder,
    batches,
    step: int,
    cfg,
    place: _Place,
    prec,
    optimizer,
    trained,
    spec,
    mix_noise,
    history,
) -> tuple[float, float]:
    """One optimiser step over ``grad_accum`` micro-batches; returns its mean loss and accuracy.

    Every random draw of the step (augmentations, dropout) comes from (seed, step, rank). The forward
    pass runs under the precision's autocast, ``backward`` outside it; a loss that is not finite
    stops the run before the optimiser touches the weights."""
    torch.manual_seed(_step_seed(cfg.seed, step, place.rank, _DROPOUT_STREAM))
    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, place.rank, _AUGMENT_STREAM))
    optimizer.zero_grad(set_to_none=True)
    step_loss, step_acc = 0.0, 0.0
    device = place.device
    for micro in range(cfg.grad_accum):
        waves, lengths, noise, noise_lengths, labels, *far = next(batches)
        waves, lengths, labels = waves.to(device), lengths.to(device), labels.to(device)
        reference = {}  # the far channel of the same clips, for a backbone that takes a noise reference
        if far:
            reference = {"reference": far[0].to(device), "reference_lengths": far[1].to(device)}
        if mix_noise:
            waves = noise_mix(
                waves, lengths, noise.to(device), noise_lengths, cfg.noise_mix_prob, cfg.noise_mix_snr, gen
            )
        perm, lam = None, 1.0
        # below 1, a coin from the step generator decides (drawn only then: runs without it stay as they were)
        mixed = cfg.mixup_alpha > 0 and (
            cfg.mixup_prob >= 1 or float(torch.rand(1, generator=gen)) < cfg.mixup_prob
        )
        if mixed:
            waves, lengths, perm, lam = mixup(waves, lengths, cfg.mixup_alpha, gen)
            if reference:  # each mixed clip gets the same mixture of the two references
                ref, ref_lengths = reference["reference"], reference["reference_lengths"]
                reference = {
                    "reference": lam * ref + (1 - lam) * ref[perm],
                    "reference_lengths": torch.maximum(ref_lengths, ref_lengths[perm]),
                }
        augment = (lambda f, n: spec(f, n, gen)) if spec else None
        sync = not place.distributed or micro == cfg.grad_accum - 1
        with model.no_sync() if not sync else contextlib.nullcontext():
            with prec.autocast():
                loss_value, acc = model(waves, lengths, labels, perm, lam, augment=augment, **reference)
            prec.scale(loss_value / cfg.grad_accum).backward()
        step_loss += float(loss_value.detach()) / cfg.grad_accum
        step_acc += float(acc) / cfg.grad_accum
    if place.distributed:
        stats = torch.tensor([step_loss, step_acc], device=device)
        dist.all_reduce(stats)
        step_loss, step_acc = (stats / place.world).tolist()
    if not math.isfinite(step_loss):
        raise FloatingPointError(_divergence_message(cfg, step, step_loss, history, prec))
    prec.unscale_(optimizer)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
    prec.step(optimizer)  # skipped (weights unchanged) when fp16 gradients overflowed
    return step_loss, step_acc


# Streams of the per-step seeds (the micro-batch slots 0..grad_accum-1 draw the batches).
_DROPOUT_STREAM, _AUGMENT_STREAM = 99, 98


def _divergence_message(cfg: TrainConfig, step: int, value: float, history: list, prec) -> str:
    finite = [h for h in history if math.isfinite(h["loss"])]
    last = (
        f"the last finite loss was {finite[-1]['loss']:.4g} at step {finite[-1]['step']}"
        if finite
        else "no step had a finite loss"
    )
    return (
        f"{cfg.name}: the training loss became {value} at step {step + 1} ({prec.mode}); {last}. The last "
        "checkpoint holds the weights before it, but resuming would replay the same steps into the same "
        f"value. Try a lower lr (now {cfg.lr:g}) or head_lr_scale (now {cfg.head_lr_scale:g}), a longer "
        f"warm-up (now {cfg.warmup_steps} steps), or precision 'fp32' (now {cfg.precision!r}), under a new "
        "name (a resumed run refuses changed settings)."
    )


def _loss_kwargs(cfg: TrainConfig) -> dict:
    if cfg.loss == "subcluster_adacos":  # no scale (adaptive) and no margin (the published loss)
        return {"k": cfg.subcenters}
    if cfg.loss == "adacos":
        return {"m": cfg.loss_m} if cfg.loss_m else {}
    kwargs = {"s": cfg.loss_s, "m": cfg.loss_m}
    if cfg.loss == "subcenter":
        kwargs["k"] = cfg.subcenters
    return kwargs


def _save_checkpoint(
    path: Path, task, optimizer, scheduler, prec, step: int, history: list, cfg: TrainConfig, checkpoint_sha1
):
    """The full resume state, replacing the previous one atomically (only the last is kept)."""
    state = {
        "model": trainable_state(task),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "precision": prec.state_dict(),
        "step": step,
        "history": history,
        "config": cfg.to_dict(),
        "checkpoint_sha1": checkpoint_sha1,
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as err:
        raise OSError(
            f"cannot write the checkpoint {path} ({err.strerror or err}); the previous checkpoint there is "
            "intact: free disk space (or raise checkpoint_minutes) and run again to resume"
        ) from err


def _export(out: Path, embedder: Embedder, history: list, cfg: TrainConfig, checkpoint_sha1) -> None:
    """``model.pt`` (the trained weights and buffers only, no optimiser state), the LoRA adapters, the
    history and its plot."""
    from kit import plots

    with atomic_path(out / "model.pt") as tmp:
        torch.save(
            {"config": cfg.to_dict(), "checkpoint_sha1": checkpoint_sha1, "state": trainable_state(embedder)},
            tmp,
        )
    if cfg.mode == "lora":
        save_adapters(embedder.backbone, out / "lora_adapters.safetensors")
    frame = pd.DataFrame(history)
    with atomic_path(out / "history.csv") as tmp:
        frame.to_csv(tmp, index=False)
    plots.close(plots.training_curves(frame, out / "training_curves.png", title=cfg.name))


def main(argv: list[str] | None = None, prog: str = "python -m kit.train") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune a backbone (runs under torchrun for several GPUs)."
    )
    parser.add_argument("config", help="YAML file of TrainConfig fields")
    parser.add_argument("--index", required=True, help="index.csv written by kit.data.save_index")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_dict(yaml.safe_load(Path(args.config).read_text()) or {})
    train(data.load_index(args.index), cfg, args.run_dir)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
