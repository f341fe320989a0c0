"""The model: a backbone and a pooling head, ``(waves, lengths) -> embeddings [B, D]``.

A :class:`ModelConfig` says what to build (backbone, checkpoint, head, embedding size, which weights
train and how); :func:`build_embedder` builds it, :func:`load_embedder` rebuilds a trained one from its
model folder. The training loop (:mod:`kit.train`, whose ``TrainConfig`` holds a ``ModelConfig``), the
extraction (:mod:`kit.embed`), the notebooks and the tools build models here, so none of them imports
the training loop to get a model. Two models have nothing to train: :func:`statistics_embedder` (log-mel
statistics) and :func:`pretrained_embedder` (a pretrained backbone as it is, pooled without weights).

A trained model folder (``<run_dir>/<name>/``) holds ``model.pt``: the model's settings, the weights
training changed and every buffer, and the SHA-1 of the pretrained checkpoint it started from. Weights
that stayed frozen (LoRA, partial and frozen modes: the backbone's) are not copied: they are read again
from that checkpoint, so a model folder moved to another machine needs the same checkpoint file there;
:func:`load_embedder` says which file and why when it is missing, takes it from ``checkpoint=`` and
checks it is the same file. A ``full`` fine-tune holds every weight, but its architecture still comes
from the checkpoint's configuration, so it needs the file too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kit import backbones, heads
from kit.lora import add_lora

MODES = ("full", "partial", "lora", "frozen")


@dataclass
class ModelConfig:
    """What model to build: the part of a training run's settings that defines the model
    (``kit.train.TrainConfig`` extends it with how to train it)."""

    backbone: str = "beats"
    checkpoint: str | None = None  # local path, HF repo id or URL; None = random-init `backbone_config`
    backbone_config: str | None = None
    backbone_options: dict = field(default_factory=dict)
    head: str = "asp"  # asp | mean | cls
    embed_dim: int = 128
    mode: str = "full"  # full | partial | lora | frozen
    train_last_n: int = 2  # blocks trained in partial mode
    lora_rank: int = 64
    lora_alpha: float | None = None  # None: alpha = rank (scale 1)
    lora_dropout: float = 0.0
    lora_targets: str | None = (
        None  # regex of the modules LoRA adapts; None: the backbone's attention projections
    )
    gradient_checkpointing: bool | None = (
        None  # None: kit.precision's rule (release size, long crops, < 24 GB GPU)
    )

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, settings) -> ModelConfig:
        """The model part of a mapping or of an object with these fields (a ``TrainConfig``)."""
        get = (
            settings.get
            if isinstance(settings, dict)
            else lambda name, default: getattr(settings, name, default)
        )
        defaults = cls()
        return cls(**{name: get(name, getattr(defaults, name)) for name in cls.fields()})


def count_parameters(module: nn.Module) -> int:
    """Every parameter of the module, trainable or frozen (the meta file's total_parameters)."""
    return int(sum(p.numel() for p in module.parameters()))


class Embedder(nn.Module):
    """Backbone + pooling head: ``(waves, lengths) -> embeddings [B, embed_dim]``."""

    def __init__(self, backbone: backbones.Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self, waves: torch.Tensor, lengths: torch.Tensor, augment=None, reference=None, reference_lengths=None
    ) -> torch.Tensor:
        """``augment``: an optional ``(features, n_frames) -> features`` the backbone applies to its
        front-end features in training mode (SpecAugment); ``reference``/``reference_lengths``: the noise
        reference of a backbone that takes one (``backbone.takes_reference``)."""
        tokens, padding_mask = self.backbone(
            waves, lengths, augment=augment, reference=reference, reference_lengths=reference_lengths
        )
        return self.head(tokens, padding_mask)


def statistics_embedder(config: str = "dcase", **options) -> Embedder:
    """The training-free branch: the log-mel backbone (``kit.backbones.logmel``, config ``config``) and
    the parameter-free ``"stats"`` head, giving ``[mean; std]`` of every band over each clip's valid
    frames. Nothing to train: ready for ``kit.embed.extract``."""
    backbone = backbones.load("logmel", config=config, **options)
    return Embedder(backbone, heads.make_head("stats", backbone.embed_dim, None)).eval()


def pretrained_embedder(
    backbone: str, checkpoint: str | os.PathLike | None, head: str = "stats", **options
) -> Embedder:
    """The frozen branch: a backbone with its pretrained weights as they are (``kit.backbones.load(backbone,
    checkpoint, **options)``) and a parameter-free head over each clip's valid time tokens: ``"stats"``,
    ``[mean; std]`` of every channel, or ``"mean"``, the mean alone. Nothing to train: ready for
    ``kit.embed.extract``."""
    if head not in ("stats", "mean"):
        raise ValueError(
            f"pretrained_embedder's head must be 'stats' or 'mean' (parameter-free), got {head!r}"
        )
    model = backbones.load(backbone, checkpoint, **options)
    pool = heads.make_head(head, model.embed_dim, None if head == "stats" else model.embed_dim)
    if head == "mean":
        pool.projection = nn.Identity()  # the masked mean itself, no weights
    for p in model.parameters():
        p.requires_grad = False
    return Embedder(model, pool).eval()


def build_embedder(cfg: ModelConfig) -> Embedder:
    """Load the backbone, attach the head and set which weights train according to ``cfg.mode`` (a
    ``ModelConfig``, or anything with its fields such as a ``TrainConfig``)."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {cfg.mode!r}: expected one of {MODES}")
    backbone = backbones.load(
        cfg.backbone, cfg.checkpoint, config=cfg.backbone_config, **cfg.backbone_options
    )
    head = heads.make_head(cfg.head, backbone.embed_dim, cfg.embed_dim)
    if cfg.mode == "lora" and not (cfg.lora_targets or backbone.lora_target_modules):
        raise ValueError(
            f"{cfg.backbone} is a CNN: LoRA targets attention projections; use full or partial "
            "(or name the layers to adapt in lora_targets)"
        )
    if cfg.mode == "lora":
        add_lora(
            backbone,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=cfg.lora_targets,
        )
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
    backbone.set_gradient_checkpointing(bool(cfg.gradient_checkpointing))
    return Embedder(backbone, head)


# ----------------------------------------------------------------------------------------------
# Trained weights: what a model folder and a training checkpoint hold


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


def file_fingerprint(path: str | os.PathLike | None) -> str | None:
    """SHA-1 of a local checkpoint file (or of a folder's files), so a resumed run recognises the same
    checkpoint moved elsewhere; None for a remote spec (a repo id or URL names its content)."""
    if path is None or not Path(path).expanduser().exists():
        return None
    path = Path(path).expanduser()
    digest = hashlib.sha1()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            if path.is_dir():  # a folder's content includes its file names; a file is its bytes alone
                digest.update(file.relative_to(path).as_posix().encode())
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 23), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def read_model(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several kinds for a corrupt or foreign file
        from kit.backbones.loading import describe_load_error  # torch's weights_only advice left out

        raise ValueError(
            f"{path} is not a model written by kit.train (corrupt or another kind): {describe_load_error(err)}"
        ) from err


def _pretrained_file(cfg: ModelConfig, saved: dict, path: Path, checkpoint) -> str | None:
    """The pretrained checkpoint to rebuild the model from: ``checkpoint`` if given, else the one the
    model was trained from. A local file must be the same file (its SHA-1); a missing one is named with
    what it is for."""
    spec = str(checkpoint) if checkpoint is not None else cfg.checkpoint
    if spec is None:
        return None
    local = Path(spec).expanduser()
    remote = spec.startswith(("http://", "https://")) or (
        not local.exists() and not backbones.looks_like_a_path(spec)
    )
    if (
        remote
    ):  # a repo id, URL or release name names its content: fetched (or found in the cache) as at training
        return spec
    recorded = saved.get("checkpoint_sha1")
    if not local.exists():
        what = {"full": "its architecture's configuration"}.get(
            cfg.mode, f"the {cfg.backbone} weights {cfg.mode} mode kept frozen"
        )
        raise backbones.CheckpointNotFoundError(
            f"{path} holds the trained weights only; {what} come from the pretrained checkpoint it was trained "
            f"from, {spec}" + (f" (sha1 {recorded})" if recorded else "") + ", which is not here: pass "
            "load_embedder(model_dir, checkpoint=PATH) with that file"
        )
    if checkpoint is not None and recorded and file_fingerprint(local) != recorded:
        raise ValueError(
            f"{local} is not the checkpoint {path} was trained from (sha1 {file_fingerprint(local)}, "
            f"the model records {recorded})"
        )
    return str(local)


def load_embedder(model_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Embedder:
    """Rebuild a trained embedder from its model folder ``<run_dir>/<name>``: ``model.pt`` (settings,
    trained weights, buffers) over the pretrained checkpoint it started from, or over ``checkpoint``
    (the same file elsewhere, e.g. on another machine; its SHA-1 is checked)."""
    model_dir = Path(model_dir)
    path = model_dir / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: has training finished for {model_dir.name}?")
    saved = read_model(path)
    cfg = ModelConfig.of(saved["config"])
    cfg = dataclasses.replace(cfg, checkpoint=_pretrained_file(cfg, saved, path, checkpoint))
    torch.manual_seed(saved["config"].get("seed", 0))
    embedder = build_embedder(cfg)
    load_trainable_state(embedder, saved["state"], str(path))
    return embedder.eval()
