"""LoRA adapters on a backbone's attention projections, with peft.

``W = W0 + (alpha / r) * B A`` on the modules matched by ``backbone.lora_target_modules`` (the
attention projections of the transformer blocks only; never the patch-embedding conv). The frozen
weights stay untouched: adapters train alone, are saved apart (a few MB instead of the whole
backbone), and can be merged into the weights for inference at no extra cost.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kit.files import atomic_path

ADAPTER_FILE = "lora_adapters.safetensors"


def add_lora(
    backbone: nn.Module,
    rank: int = 64,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | None = None,
) -> nn.Module:
    """Inject LoRA adapters (in place) and freeze every non-adapter weight of ``backbone``.
    ``targets``: a regular expression (full match) of the module names to adapt; None: the backbone's
    ``lora_target_modules`` (its attention projections)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    pattern = targets or getattr(backbone, "lora_target_modules", "")
    if not pattern:
        raise ValueError(f"{type(backbone).__name__} declares no lora_target_modules pattern")
    if targets and not any(re.fullmatch(targets, name) for name, _ in backbone.named_modules()):
        raise ValueError(f"lora_targets {targets!r} matches no module of {type(backbone).__name__}")
    from peft import LoraConfig, inject_adapter_in_model  # peft takes seconds to import: only when used

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=pattern,
        bias="none",
    )
    inject_adapter_in_model(config, backbone)
    for name, param in backbone.named_parameters():
        param.requires_grad = "lora_" in name
    return backbone


def _lora_layer():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, _lora_layer()) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (what ``save_adapters`` writes)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters alone to a safetensors file (atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into a model that already has LoRA injected."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(path)))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"{path}: adapter keys do not fit this model: {missing[:5]}")
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place)."""
    layer = _lora_layer()
    for name, module in list(model.named_modules()):
        if isinstance(module, layer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
