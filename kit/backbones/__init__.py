"""One door to every pretrained audio backbone: ``kit.backbones.load(name, checkpoint, **options)``.

Each backbone lives in its own file (``beats.py``, ``eat.py``, ``fisher.py``; ``efficientat.py``,
EfficientAT's AudioSet-pretrained MobileNetV3 CNNs; ``cnn.py``, a compact
network trained from scratch; ``logmel.py``, the training-free log-mel frames; ``nabeats.py``, MERL's
NA-BEATs: frozen BEATs fusing the far channel by cross-attention, ``takes_reference``) holding its
architecture, its named configurations (frozen dataclasses in ``CONFIGS``) and a pure
``filter_state(raw) -> (config, state)`` that turns a read checkpoint into its own names. Beside
them, ``layers.py`` holds the layers EAT and FISHER share (attention, MLP, transformer block, 2-D
sin-cos positions) and ``loading.py`` the one checkpoint loader (read the file, filter it, load it
strictly naming missing/unexpected keys and wrong shapes). Every backbone answers the same small
interface (:class:`Backbone`):

- ``model(waves [B, T] float at 16 kHz, lengths [B] samples, augment=None, reference=None,
  reference_lengths=None) -> (tokens [B, N, D], padding_mask [B, N])`` where ``padding_mask`` is True
  on tokens that come only from padding, ``augment`` an optional callable ``(features, n_frames) ->
  features`` (SpecAugment) applied between the front-end and the encoder, in training mode only, and
  ``reference`` [B, T'] (with ``reference_lengths`` [B]) a second input, a noise reference such as the
  far channel, for the backbones whose ``takes_reference`` is True (they require it; the others
  refuse it with a clear error rather than ignore it);
- ``model.grid_tokens(waves, lengths, reference=None, reference_lengths=None) -> (tokens [B, T, F, D],
  padding_mask [B, T])``: for backbones whose tokens come from a time x frequency grid (``has_grid``),
  the same tokens kept per frequency band F (for per-band pooling and scoring); the others raise;
- ``model.frontend(waves, lengths) -> (features, feature_lengths)``: the backbone's own input features;
- ``model.embed_dim``: D; ``model.blocks``: the transformer blocks (``nn.ModuleList``), for partial
  fine-tuning; ``model.lora_target_modules``: a regular expression for peft that matches the
  attention projections of the blocks only; ``model.pretrained``: whether loaded weights are in use
  (set by the loader);
- ``model.set_gradient_checkpointing(flag)``.

Training and scoring code use only this interface and never branch on a backbone's name.

``checkpoint`` is a local path (file or folder), a Hugging Face repo id (``owner/name``) or an
``http(s)://`` URL; remote ones are fetched into a cache folder. With ``checkpoint=None`` a small named
configuration of the same architecture is built from random initialisation (``config=...``), and a
warning says plainly that no pretrained weights are in use.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

BACKBONES = ("beats", "eat", "fisher", "efficientat", "cnn", "logmel", "nabeats")
DEFAULT_CACHE = Path(os.environ.get("KIT_CACHE", Path.home() / ".cache" / "dcase2026-kit"))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong backbone, corrupt file, missing/unexpected keys."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint given as a local path that does not exist."""


class Backbone(nn.Module):
    """Common base of the backbones. Subclasses set the attributes below and implement
    ``frontend`` and ``forward``."""

    name: str = ""
    embed_dim: int = 0
    lora_target_modules: str = ""
    pretrained: bool = False
    # True for backbones meant to be trained from scratch (cnn) or that have nothing to train
    # (logmel): random initialisation is their normal start, so load() does not warn about it.
    trains_from_scratch: bool = False
    sample_rate: int = 16000
    # True for backbones that take a noise reference (the far channel) as a second input and require it.
    takes_reference: bool = False
    # True for backbones whose tokens come from a time x frequency grid: grid_tokens gives [B, T, F, D].
    has_grid: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = bool(enabled)

    def _augmented(self, features: torch.Tensor, n_frames: torch.Tensor, augment) -> torch.Tensor:
        """``augment(features, n_frames)`` in training mode; the features unchanged otherwise."""
        if augment is not None and self.training:
            return augment(features, n_frames)
        return features

    def _no_reference(self, reference: torch.Tensor | None) -> None:
        """Refuse a noise reference: only the backbones whose ``takes_reference`` is True use one, and
        silently ignoring it would hide a wrong setting."""
        if reference is not None:
            raise ValueError(
                f"{self.name} takes no reference input (a noise reference such as the far channel is a "
                "second input only for backbones with takes_reference, e.g. nabeats); pass reference=None"
            )

    def frontend(self, waves: torch.Tensor, lengths: torch.Tensor | None = None):
        raise NotImplementedError

    def grid_tokens(
        self,
        waves: torch.Tensor,
        lengths: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        reference_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens [B, T, F, D], padding_mask [B, T])``: the tokens on their time x frequency grid."""
        raise ValueError(
            f"{self.name} has no time x frequency grid of tokens (has_grid is False): per-band pooling "
            "and scoring need a backbone whose tokens keep frequency"
        )

    def forward(
        self,
        waves: torch.Tensor,
        lengths: torch.Tensor | None = None,
        augment=None,
        reference: torch.Tensor | None = None,
        reference_lengths: torch.Tensor | None = None,
    ):
        raise NotImplementedError


def _module(name: str):
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    return importlib.import_module(f"kit.backbones.{name}")


def configs(name: str) -> list[str]:
    """Names of the random-initialisation configurations a backbone offers."""
    return sorted(_module(name).CONFIGS)


_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json", ".yaml", ".zip")


def looks_like_a_path(text: str) -> bool:
    """A spec that can only mean a local file: it starts like a path, has a checkpoint file
    extension, has more than one folder level, or its first folder exists here."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.lower().endswith(_CHECKPOINT_SUFFIXES):
        return True
    parts = Path(text).parts
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def resolve_checkpoint(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn a checkpoint spec into a local path: a local file/folder as is, a URL downloaded
    (resumable) into ``cache_dir``, a Hugging Face repo id snapshot-downloaded into ``cache_dir``."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    text = str(spec)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if text.startswith(("http://", "https://")):
        from kit.download import fetch

        target = cache / "urls" / Path(text.split("?")[0]).name
        try:
            return fetch(text, target)
        except OSError as err:
            raise CheckpointError(
                f"cannot download checkpoint {text} (offline?): {err}. On a machine without internet, "
                f"download the file elsewhere, copy it to {target} (the cache) or give its local path "
                "instead (the recipes' *_CHECKPOINT variables, ./run_all.sh --help)"
            ) from err
    if looks_like_a_path(text):
        raise CheckpointNotFoundError(
            f"checkpoint file not found: {local} (resolved from {Path.cwd()}); a Hugging Face repo id "
            "has the form owner/name without a file extension"
        )
    if _HF_REPO.match(text):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=text, cache_dir=str(cache / "hf")))
        except Exception as err:  # huggingface_hub raises several kinds when offline
            raise CheckpointError(
                f"cannot fetch Hugging Face repo {text!r} (offline, or no such repo?): {err}. "
                "Download the checkpoint elsewhere and pass its local path."
            ) from err
    raise CheckpointError(
        f"checkpoint {text!r} is neither an existing path, a URL nor a Hugging Face repo id"
    )


def load(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    config: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> Backbone:
    """Build backbone ``name`` (``beats``, ``eat``, ``fisher``, ``cnn`` or ``logmel``).

    With a ``checkpoint`` the released weights are loaded exactly (strict key and shape check, through
    the module's ``from_checkpoint`` and :mod:`kit.backbones.loading`); without one,
    the named random-initialisation ``config`` (default: the module's small CPU configuration) is
    built and a warning says that no pretrained weights are in use (not for the backbones whose
    ``trains_from_scratch`` is True: ``cnn``, made to train from scratch, and the weightless ``logmel``). ``options`` are backbone
    specific (EAT: ``target_length``; FISHER: ``pad_to``).
    """
    module = _module(name)
    if checkpoint is None:
        config = config or module.DEFAULT_CONFIG
        if config not in module.CONFIGS:
            raise ValueError(
                f"unknown {name} config {config!r}: expected one of {', '.join(sorted(module.CONFIGS))}"
            )
        model = module.build(config, **options)
        if not model.trains_from_scratch:
            warnings.warn(
                f"{name}: no checkpoint given, building the '{config}' configuration from random "
                "initialisation - NO PRETRAINED WEIGHTS ARE IN USE",
                stacklevel=2,
            )
        return model
    if hasattr(module, "release_checkpoint"):  # a release name (efficientat's mn10_as) -> its URL
        checkpoint = module.release_checkpoint(checkpoint)
    return module.from_checkpoint(resolve_checkpoint(checkpoint, cache_dir), **options)


def lora_targets(model: Backbone) -> list[str]:
    """Names of the modules that ``model.lora_target_modules`` selects (for inspection and tests)."""
    pattern = re.compile(model.lora_target_modules)
    return [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
