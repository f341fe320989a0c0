"""Fine-tune a pretrained backbone into a machine-sound embedder with a proxy classification task.

The recipe of both seed reports: backbone -> pooling head -> low-dimensional embedding, trained with an
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

from kit import backbones, data, heads, losses
from kit.augment import SpecAugment, mixup, noise_mix
from kit.files import atomic_path, write_text_atomic
from kit.lora import add_lora, save_adapters

MODES = ("full", "partial", "lora", "frozen")


@dataclass
class TrainConfig:
    """Every knob of a fine-tuning run (papermill parameters map onto these names)."""

    name: str = "beats"
    backbone: str = "beats"
    checkpoint: str | None = None  # local path, HF repo id or URL; None = random-init `backbone_config`
    backbone_config: str | None = None
    backbone_options: dict = field(default_factory=dict)
    mode: str = "full"
    train_last_n: int = 2
    lora_rank: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    head: str = "asp"
    embed_dim: int = 128
    loss: str = "arcface"
    loss_s: float = 30.0
    loss_m: float = 0.5
    subcenters: int = 3
    label_scheme: str = "composite"
    channels: tuple[str, ...] = ("near", "far")
    train_datasets: tuple[str, ...] = ("dev", "eval")
    length_mode: str = "random_crop"  # or "pad_or_cut" (the EAT-ASP seed pads to 16 s)
    crop_seconds: float = 4.0
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    head_lr: float | None = None  # default: 10x lr for the freshly initialised head and loss
    weight_decay: float = 0.01
    warmup_steps: int = 20
    spec_augment: bool = True
    mixup_alpha: float = 0.0
    noise_mix_prob: float = 0.0
    noise_mix_snr: tuple[float, float] = (5.0, 20.0)
    balance_machines: bool = True
    gradient_checkpointing: bool = False
    amp: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    num_workers: int = 0
    device: str | None = None

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training parameter(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        for key in ("channels", "train_datasets", "noise_mix_snr"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {self.mode!r}: expected one of {MODES}")
        bad = [c for c in self.channels if c not in ("near", "far")]
        if bad or not self.channels:
            raise ValueError(f"channels must be a non-empty subset of ('near', 'far'), got {self.channels}")
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ValueError("steps, batch_size and grad_accum must be positive")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("channels", "train_datasets", "noise_mix_snr"):
            out[key] = list(out[key])
        return out


class Embedder(nn.Module):
    """Backbone + pooling head: ``(waves, lengths) -> embeddings [B, embed_dim]``."""

    def __init__(self, backbone: backbones.Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tokens, padding_mask = self.backbone(waves, lengths)
        return self.head(tokens, padding_mask)


def build_embedder(cfg: TrainConfig) -> Embedder:
    """Load the backbone, attach the head and set which weights train according to ``cfg.mode``."""
    backbone = backbones.load(
        cfg.backbone, cfg.checkpoint, config=cfg.backbone_config, **cfg.backbone_options
    )
    head = heads.make_head(cfg.head, backbone.embed_dim, cfg.embed_dim)
    if cfg.mode == "lora":
        add_lora(backbone, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    elif cfg.mode in ("partial", "frozen"):
        for p in backbone.parameters():
            p.requires_grad = False
        if cfg.mode == "partial":
            if not 0 < cfg.train_last_n <= len(backbone.blocks):
                raise ValueError(
                    f"train_last_n={cfg.train_last_n} but the backbone has {len(backbone.blocks)} blocks"
                )
            for block in backbone.blocks[-cfg.train_last_n :]:
                for p in block.parameters():
                    p.requires_grad = True
    backbone.set_gradient_checkpointing(cfg.gradient_checkpointing)
    return Embedder(backbone, head)


# ----------------------------------------------------------------------------------------------
# Data: one item per (clip, channel); batches are a pure function of (seed, step, rank)


class TrainItems(Dataset):
    """Training examples for the proxy task. A sampler yields ``(item, seed)`` pairs, and the crop
    (and the noise clip, when noise mixing is on) of that item is drawn from ``seed``."""

    def __init__(
        self, items: pd.DataFrame, labels: np.ndarray, length: data.LengthPolicy, noise_paths: list[str]
    ):
        self.paths = items["path"].tolist()
        self.channels = items["channel"].tolist()
        self.labels = labels
        self.length = length
        self.noise_paths = noise_paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        rng = np.random.default_rng(seed)
        wave = self.length.apply(data.load_audio(self.paths[index], channel=self.channels[index]), rng)
        noise = np.zeros(0, dtype=np.float32)
        if self.noise_paths:
            source = self.noise_paths[int(rng.integers(len(self.noise_paths)))]
            noise = self.length.apply(data.load_audio(source, channel="far"), rng)
        return wave, noise, int(self.labels[index])


def _collate(batch):
    waves, noises, labels = zip(*batch)
    lengths = torch.tensor([len(w) for w in waves])
    noise_lengths = torch.tensor([len(n) for n in noises])
    out = torch.zeros(len(waves), int(lengths.max()))
    noise_out = torch.zeros(len(waves), max(1, int(noise_lengths.max())))
    for i, (w, n) in enumerate(zip(waves, noises)):
        out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
        noise_out[i, : len(n)] = torch.from_numpy(np.asarray(n, dtype=np.float32))
    return out, lengths, noise_out, noise_lengths, torch.tensor(labels)


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
    if "far" in cfg.channels and (rows["channels"] < 2).any():
        mono = rows.loc[rows["channels"] < 2, "path"].iloc[0]
        raise ValueError(f"channel 'far' requested but {mono} is mono; use channels=('near',) for mono data")
    parts = [rows.assign(channel=c) for c in cfg.channels]
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

    def forward(self, waves, lengths, labels, perm=None, lam=1.0):
        emb = self.embedder(waves, lengths)
        loss = self.loss(emb, labels)
        if perm is not None and lam < 1.0:
            loss = lam * loss + (1 - lam) * self.loss(emb, labels[perm])
        with torch.no_grad():
            acc = (self.loss.logits(emb.detach()).argmax(-1) == labels).float().mean()
        return loss, acc


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights that training changes (plus all buffers): what checkpoints and ``model.pt`` hold.
    Frozen backbone weights are rebuilt from the original checkpoint, so they are not copied."""
    state = {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu() for n, b in module.named_buffers()})
    return state


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(
            f"{source}: weights {unknown[:5]} do not belong to this model (another configuration?)"
        )
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise ValueError(
                    f"{source}: {name} has shape {tuple(value.shape)}, model expects {tuple(own[name].shape)}"
                )
            own[name].copy_(value)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def train(
    index: pd.DataFrame,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Run (or resume) fine-tuning; returns the output folder ``<run_dir>/<cfg.name>``.

    ``stop_after`` ends the run after that many steps of this call (checkpoint written), as an
    interruption would: the next call resumes from it. Used by tests and for time-boxed sessions.
    """
    cfg.validate()
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    device = _device(cfg, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(run_dir) / cfg.name
    ckpt_path = out / "checkpoints" / "last.pt"

    torch.manual_seed(cfg.seed)  # same initial head/loss weights on every rank
    random.seed(cfg.seed)
    items = training_items(index, cfg)
    codes, classes = data.make_labels(items, cfg.label_scheme)
    embedder = build_embedder(cfg)
    loss = losses.make_loss(cfg.loss, cfg.embed_dim, len(classes), **_loss_kwargs(cfg))
    task = ProxyTask(embedder, loss).to(device)

    backbone_params = [p for p in embedder.backbone.parameters() if p.requires_grad]
    other_params = [p for p in list(embedder.head.parameters()) + list(loss.parameters()) if p.requires_grad]
    groups = [{"params": other_params, "lr": cfg.head_lr or cfg.lr * 10}]
    if backbone_params:
        groups.insert(0, {"params": backbone_params, "lr": cfg.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))

    start, history = 0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{ckpt_path} was written by another configuration; use a new run_dir or name")
        load_trainable_state(task, state["model"], str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
    if rank == 0:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text_atomic(out / "classes.txt", "\n".join(classes) + "\n")

    model = (
        nn.parallel.DistributedDataParallel(  # layerdrop (BEATs) skips blocks at random
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
        if distributed
        else task
    )
    length = data.LengthPolicy(mode=cfg.length_mode, seconds=cfg.crop_seconds)
    noise_paths = []
    if cfg.noise_mix_prob > 0:
        stereo = items[items["channels"] >= 2]
        if stereo.empty:
            raise ValueError("noise_mix_prob > 0 needs stereo clips (far channel as noise source)")
        noise_paths = sorted(stereo["path"].unique())
    dataset = TrainItems(items, codes, length, noise_paths)
    sampler = StepBatches(
        items["machine"].to_numpy(),
        cfg.batch_size,
        cfg.steps,
        cfg.grad_accum,
        cfg.seed,
        rank,
        cfg.balance_machines,
        start=start,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    spec = SpecAugment() if cfg.spec_augment else None
    autocast = device.type == "cuda" and cfg.amp
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

    task.train()
    bar = tqdm(total=end - start, desc=f"train {cfg.name}", disable=not progress or rank != 0)
    batches = iter(loader)
    for step in range(start, end):
        # Every random draw of this step (augmentations, dropout) comes from (seed, step, rank).
        torch.manual_seed(_step_seed(cfg.seed, step, rank, 99))
        gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank, 98))
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_acc = 0.0, 0.0
        for micro in range(cfg.grad_accum):
            waves, lengths, noise, noise_lengths, labels = next(batches)
            waves, lengths, labels = waves.to(device), lengths.to(device), labels.to(device)
            if noise_paths:
                waves = noise_mix(
                    waves,
                    lengths,
                    noise.to(device),
                    noise_lengths,
                    cfg.noise_mix_prob,
                    cfg.noise_mix_snr,
                    gen,
                )
            perm, lam = None, 1.0
            if cfg.mixup_alpha > 0:
                waves, lengths, perm, lam = mixup(waves, lengths, cfg.mixup_alpha, gen)
            embedder.backbone.feature_augment = (lambda f, n, g=gen: spec(f, n, g)) if spec else None
            sync = not distributed or micro == cfg.grad_accum - 1
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss_value, acc = model(waves, lengths, labels, perm, lam)
                (loss_value / cfg.grad_accum).backward()
            step_loss += float(loss_value.detach()) / cfg.grad_accum
            step_acc += float(acc) / cfg.grad_accum
        embedder.backbone.feature_augment = None
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 5.0)
        optimizer.step()
        scheduler.step()
        if distributed:
            stats = torch.tensor([step_loss, step_acc], device=device)
            dist.all_reduce(stats)
            step_loss, step_acc = (stats / world).tolist()
        history.append(
            {"step": step + 1, "loss": step_loss, "accuracy": step_acc, "lr": optimizer.param_groups[0]["lr"]}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{step_acc:.2f}")
        if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end):
            _save_checkpoint(ckpt_path, task, optimizer, scheduler, step + 1, history, cfg)
    bar.close()
    task.eval()

    if rank == 0 and end == cfg.steps:
        _export(out, embedder, history, cfg)
    if distributed:
        dist.barrier()
    return out


def _loss_kwargs(cfg: TrainConfig) -> dict:
    if cfg.loss == "adacos":
        return {"m": cfg.loss_m} if cfg.loss_m else {}
    kwargs = {"s": cfg.loss_s, "m": cfg.loss_m}
    if cfg.loss == "subcenter":
        kwargs["k"] = cfg.subcenters
    return kwargs


def _save_checkpoint(
    path: Path, task: nn.Module, optimizer, scheduler, step: int, history: list, cfg: TrainConfig
):
    state = {
        "model": trainable_state(task),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "history": history,
        "config": cfg.to_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _export(out: Path, embedder: Embedder, history: list, cfg: TrainConfig) -> None:
    from kit import plots

    with atomic_path(out / "model.pt") as tmp:
        torch.save({"config": cfg.to_dict(), "state": trainable_state(embedder)}, tmp)
    if cfg.mode == "lora":
        save_adapters(embedder.backbone, out / "lora_adapters.safetensors")
    frame = pd.DataFrame(history)
    with atomic_path(out / "history.csv") as tmp:
        frame.to_csv(tmp, index=False)
    plots.training_curves(frame, out / "training_curves.png", title=cfg.name)


def load_embedder(model_dir: str | os.PathLike) -> Embedder:
    """Rebuild a fine-tuned embedder from ``<run_dir>/<name>`` (config + original checkpoint + model.pt)."""
    model_dir = Path(model_dir)
    path = model_dir / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: has training finished for {model_dir.name}?")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(saved["config"])
    torch.manual_seed(cfg.seed)
    embedder = build_embedder(cfg)
    load_trainable_state(embedder, saved["state"], str(path))
    return embedder.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Fine-tune a backbone (runs under torchrun for several GPUs)."
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
