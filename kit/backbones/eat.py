"""EAT (Efficient Audio Transformer): the data2vec 2.0 image-modality encoder run on log-mel patches.

Front-end (as the authors' feature-extraction script): ``wave - wave.mean()`` over the clip's own
samples, Kaldi fbank (128 mel bins, Hanning window, 25 ms / 10 ms), zero-padded or cut to
``target_length`` frames, THEN normalised with ``(x + 4.268) / (2 * 4.569)`` (so padded frames carry
the normalised value of 0, exactly as in the official code).

Encoder: a 16x16 Conv2d patch embedding (``local_encoder.proj``) over the ``[T, 128]`` image, flattened
time-major (token ``t * 8 + f``), fixed 2-D sin-cos ``positions`` added, a CLS token
(``extra_tokens``) prepended, a LayerNorm (``pre_norm``, fairseq's ``context_encoder.norm``), then
post-LN blocks ``r = norm1(x + attn(x)); x = norm2(r + mlp(r))`` with a fused ``attn.qkv`` (the
shared :mod:`kit.backbones.layers`; the positions are computed in float64 as in the official code).

Padded frames are attended exactly as in the official code (a batch of clips therefore gives each
clip the result of running it alone); the returned padding mask only marks the patch tokens that
come from padding alone, so pooling can ignore them.

Checkpoints: the official fairseq ``.pt`` files (pre-trained ``data2vec_multi`` and fine-tuned
``mae_image_classification``) and the Hugging Face folders (``config.json`` + ``model.safetensors``).
:func:`filter_state` recognises the layout from the keys and drops pre-training-only parts (the
decoder, the EMA teacher) and a fine-tuned classification head; :mod:`kit.backbones.loading` reads
the files and checks that every other key is present with its exact shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kit import features
from kit.backbones import Backbone, CheckpointError, layers, loading
from kit.backbones.layers import sincos_positions

# Normalisation of the AudioSet fbank statistics used for every released EAT model.
FBANK_MEAN = -4.268
FBANK_STD = 4.569
N_MELS = 128


@dataclass(frozen=True)
class EATConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    patch_size: int = 16
    # Number of time patches the fixed positions cover (768 patches = 12288 frames, about 2 minutes).
    max_length: int = 768

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(
                f"EAT embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads} and by 4 "
                "(the 2-D sin-cos positions)"
            )


CONFIGS: dict[str, EATConfig] = {
    "base": EATConfig(embed_dim=768, depth=12, num_heads=12),
    "large": EATConfig(embed_dim=1024, depth=24, num_heads=16),
    "cpu": EATConfig(embed_dim=192, depth=4, num_heads=4),
    "unit": EATConfig(embed_dim=32, depth=2, num_heads=2),  # unit tests
}
DEFAULT_CONFIG = "cpu"
# The released sizes and their configuration (kit.tools.bench benchmarks these).
RELEASES = {"EAT-base": {"config": "base"}, "EAT-large": {"config": "large"}}


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # [B, 1, T, F] -> [B, D, T/16, F/16] -> [B, T/16 * F/16, D], time-major as in the official code.
        return self.proj(images).flatten(2).transpose(1, 2)


class Block(layers.Block):
    """The shared post-LN block, its parameters enumerated as EAT's always were (attn, norm1, mlp,
    norm2). Training checkpoints index the optimiser state by that order, and gradient clipping sums
    the gradient norms in it, so EAT runs keep resuming and reproducing bit for bit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("attn", "norm1", "mlp", "norm2"):
            self._modules[name] = self._modules.pop(name)


class EAT(Backbone):
    name = "eat"
    # Attention projections of the blocks only: the patch Conv2d is also called ``proj``.
    lora_target_modules = r"blocks\.\d+\.attn\.(qkv|proj)"
    has_grid = True  # 16x16 patches: 8 frequency bands per 16 frames

    def __init__(self, config: EATConfig, target_length: int = 1024) -> None:
        super().__init__()
        if target_length <= 0 or target_length % config.patch_size:
            raise ValueError(
                f"EAT target_length must be a positive multiple of {config.patch_size} frames, "
                f"got {target_length}"
            )
        if target_length // config.patch_size > config.max_length:
            raise ValueError(
                f"EAT target_length {target_length} frames needs {target_length // config.patch_size} time "
                f"patches but the positions cover only {config.max_length}"
            )
        self.config = config
        self.target_length = target_length
        self.embed_dim = dim = config.embed_dim
        self.freq_patches = N_MELS // config.patch_size
        self.local_encoder = PatchEmbed(config.embed_dim, config.patch_size)
        self.register_buffer(
            "positions",
            sincos_positions(config.embed_dim, config.max_length, self.freq_patches, dtype=np.float64),
        )
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        nn.init.normal_(self.extra_tokens, std=0.02)
        self.pre_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.qkv_bias, config.norm_eps)
            for _ in range(config.depth)
        )

    @property
    def max_input_seconds(self) -> float:
        """Frames past ``target_length`` (10 ms each) are cut off by the front-end."""
        return self.target_length / 100.0

    def frontend(
        self, waves: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``waves [B, T]`` at 16 kHz -> (normalised fbank ``[B, 1, target_length, 128]``,
        valid frames ``[B]``, capped at ``target_length``)."""
        if waves.dim() != 2:
            raise ValueError(f"EAT expects waves of shape [batch, samples], got {tuple(waves.shape)}")
        waves = waves.float()
        if lengths is None:
            lengths = torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long, device=waves.device)
        lengths = torch.as_tensor(lengths, device=waves.device)
        # The official script removes the mean of the clip itself; padding must not enter it.
        valid = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]
        in_clip = torch.where(valid, waves, 0.0)
        means = in_clip.sum(dim=1, keepdim=True) / lengths[:, None].clamp(min=1)
        centred = torch.where(valid, in_clip - means, 0.0)
        fbank, n_frames = features.kaldi_fbank(
            centred,
            lengths,
            num_mel_bins=N_MELS,
            sample_frequency=float(self.sample_rate),
            frame_shift=10.0,
            dither=0.0,
            window_type="hanning",
            htk_compat=True,
            use_energy=False,
        )
        kept = min(fbank.shape[1], self.target_length)
        image = fbank.new_zeros(fbank.shape[0], self.target_length, N_MELS)
        image[:, :kept] = fbank[:, :kept]
        image = (image - FBANK_MEAN) / (2 * FBANK_STD)
        return image[:, None], n_frames.clamp(max=self.target_length)

    def forward(
        self,
        waves: torch.Tensor,
        lengths: torch.Tensor | None = None,
        augment=None,
        reference=None,
        reference_lengths=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``waves [B, T]`` -> (tokens ``[B, 1 + N, D]`` CLS first, padding mask ``[B, 1 + N]``);
        ``augment(features, n_frames)`` is applied to the fbank in training mode."""
        self._no_reference(reference)
        features, n_frames = self.frontend(waves, lengths)
        features = self._augmented(features, n_frames, augment)
        return self.encode(features), self.padding_mask(n_frames)

    def grid_tokens(
        self,
        waves: torch.Tensor,
        lengths: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        reference_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s patch tokens without the CLS token, on their grid: ``(tokens [B, T, 8, D],
        padding_mask [B, T])``, T = ``target_length / 16`` time patches, 8 frequency patches (16 mel
        bins each, low to high). The patch embedding flattens time-major (token ``1 + t * 8 + f``), so
        this is a slice and a reshape; the mask marks the time patches that hold padding alone."""
        tokens, padding_mask = self(waves, lengths, reference=reference, reference_lengths=reference_lengths)
        patches, patch_mask = tokens[:, 1:], padding_mask[:, 1:]
        batch, n_patches, dim = patches.shape
        bands = self.freq_patches
        grid_mask = patch_mask.reshape(batch, n_patches // bands, bands)[:, :, 0]
        return patches.reshape(batch, n_patches // bands, bands, dim), grid_mask

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised fbank ``[B, 1, T, 128]`` -> all tokens ``[B, 1 + T/16 * 8, D]``."""
        patches = self.local_encoder(features)
        patches = patches + self.positions[:, : patches.shape[1]]
        x = torch.cat([self.extra_tokens.expand(patches.shape[0], -1, -1), patches], dim=1)
        x = self.pre_norm(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def padding_mask(self, n_frames: torch.Tensor) -> torch.Tensor:
        """True on patch tokens whose frames all lie beyond the clip's valid frames; CLS never."""
        time_patches = self.target_length // self.config.patch_size
        patch_start = torch.arange(time_patches, device=n_frames.device) * self.config.patch_size
        patch_is_padding = (patch_start[None, :] >= n_frames[:, None]).repeat_interleave(self.freq_patches, 1)
        cls_column = torch.zeros_like(patch_is_padding[:, :1])
        return torch.cat([cls_column, patch_is_padding], dim=1)


def build(config_name: str = DEFAULT_CONFIG, target_length: int = 1024, **options) -> EAT:
    """A randomly initialised EAT of a named size (``base``, ``large``, ``cpu``); ``options`` override
    fields of :class:`EATConfig` (e.g. ``depth=2``)."""
    if config_name not in CONFIGS:
        raise ValueError(f"unknown EAT config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}")
    try:
        config = replace(CONFIGS[config_name], **options)
    except TypeError as err:
        raise ValueError(f"unknown EAT option in {sorted(options)}: {err}") from err
    return EAT(config, target_length=target_length)


# ----------------------------------------------------------------------------- checkpoint filter

# Parts of the pre-training model the encoder never uses (fairseq ``remove_pretraining_modules``).
_PRETRAINING_ONLY = re.compile(
    r"(modality_encoders\.IMAGE\.decoder\.|_ema$|_ema\.|shared_decoder\.|recon_proj\.|cls_proj\.)"
)
# The classification head of the AS2M fine-tuned models; tokens are taken before it.
_CLASSIFIER_HEAD = re.compile(r"(fc_norm|head)\.")
_FAIRSEQ_RENAMES = (
    ("modality_encoders.IMAGE.context_encoder.norm.", "pre_norm."),
    ("modality_encoders.IMAGE.fixed_positional_encoder.positions", "positions"),
    ("modality_encoders.IMAGE.", ""),
)
_HF_RENAMES = (("fixed_positional_encoder.positions", "positions"),)


def _config_from_fields(fields: dict) -> EATConfig:
    """EATConfig from the fields shared by the fairseq ``cfg.model`` and the HF ``config.json``."""
    image = fields.get("modalities", {}).get("image", {})
    try:
        config = EATConfig(
            embed_dim=int(fields["embed_dim"]),
            depth=int(fields["depth"]),
            num_heads=int(fields["num_heads"]),
            mlp_ratio=float(fields.get("mlp_ratio", 4.0)),
            norm_eps=float(fields.get("norm_eps", 1e-6)),
            qkv_bias=bool(fields.get("qkv_bias", True)),
            patch_size=int(image.get("patch_size", fields.get("patch_size", 16))),
            max_length=int(image.get("max_length", fields.get("max_length", 768))),
        )
    except KeyError as err:
        raise CheckpointError(f"EAT config lacks the field {err.args[0]!r}") from err
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"inconsistent EAT config: {err}") from err
    unsupported = {
        "layer_norm_first": fields.get("layer_norm_first", False),
        "norm_affine": not fields.get("norm_affine", True),
        "prenet_depth": image.get("prenet_depth", 0),
        "use_alibi_encoder": image.get("use_alibi_encoder", False),
        "fixed_positions": not image.get("fixed_positions", fields.get("fixed_positions", True)),
    }
    flagged = [name for name, value in unsupported.items() if value]
    if flagged or image.get("num_extra_tokens", 1) != 1:
        raise CheckpointError(
            "EAT variant not supported (released EAT models use post-LN blocks, affine norms, no prenet, "
            f"no ALiBi, fixed positions and one CLS token); offending fields: {flagged or ['num_extra_tokens']}"
        )
    return config


def _foreign_backbone(fields: object, keys: list[str]) -> str | None:
    """Name of the other backbone a checkpoint belongs to, from its config fields and keys."""
    fields = fields if isinstance(fields, dict) else {}
    image = fields.get("modalities", {}).get("image", {})
    if "band_width" in fields or "band_width" in image or fields.get("model_type") == "fisher":
        return "fisher"
    if "encoder_layers" in fields or any(str(k).startswith("encoder.layers.") for k in keys):
        return "beats"
    return None


def _refuse_foreign(fields: object, keys: list[str]) -> None:
    other = _foreign_backbone(fields, keys)
    if other:
        raise CheckpointError(
            f"this is a {other.upper()} checkpoint, not EAT: load it with kit.backbones.load({other!r}, ...)"
        )


def _fairseq_state(loaded: object) -> tuple[EATConfig, dict]:
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict) or "cfg" not in loaded:
        raise CheckpointError(
            "not an EAT checkpoint: expected a fairseq checkpoint (a dict with 'cfg' and 'model') or a "
            f"Hugging Face folder ({loading.HF_CONFIG} + {loading.HF_WEIGHTS})"
        )
    cfg, weights = loaded["cfg"], loaded["model"]
    model_fields = cfg.get("model") if isinstance(cfg, dict) else None
    _refuse_foreign(model_fields if isinstance(model_fields, dict) else cfg, list(weights))
    if not isinstance(model_fields, dict):
        raise CheckpointError("'cfg' has no 'model' section, so this is not an EAT fairseq checkpoint")
    if "pretrained_model_args" in model_fields:
        # A fine-tuned model: the encoder's config is the pre-training one, its weights sit under ``model.``.
        pretrained = model_fields["pretrained_model_args"] or {}
        model_fields = pretrained.get("model", {})
        weights = {k.removeprefix("model."): v for k, v in weights.items() if not _CLASSIFIER_HEAD.match(k)}
    config = _config_from_fields(model_fields)
    state = {
        loading.rename_prefix(key, _FAIRSEQ_RENAMES): value
        for key, value in weights.items()
        if not _PRETRAINING_ONLY.match(key)
    }
    return config, state


def _hf_state(folder: dict) -> tuple[EATConfig, dict]:
    fields, weights = folder[loading.HF_CONFIG], folder[loading.HF_WEIGHTS]
    _refuse_foreign(fields, list(weights))
    config = _config_from_fields(fields)
    state = {
        loading.rename_prefix(key.removeprefix("model."), _HF_RENAMES): value
        for key, value in weights.items()
        if not _CLASSIFIER_HEAD.match(key)
    }
    return config, state


def filter_state(raw: object) -> tuple[EATConfig, dict]:
    """A read checkpoint (:func:`kit.backbones.loading.read_checkpoint`) -> (config, state dict in this
    module's names). The layout is recognised from the keys: a Hugging Face folder
    (``config.json`` + ``model.safetensors``) or a fairseq ``.pt`` (``cfg`` + ``model``, pre-trained or
    fine-tuned); pre-training-only parts and a classification head are dropped."""
    if isinstance(raw, dict) and loading.HF_WEIGHTS in raw and loading.HF_CONFIG in raw:
        return _hf_state(raw)
    return _fairseq_state(raw)


def from_checkpoint(path: str | Path, target_length: int = 1024) -> EAT:
    """Load released EAT weights from a fairseq ``.pt`` file or a Hugging Face folder, exactly."""
    model = loading.load_checkpoint(
        path, "EAT", filter_state, lambda config: EAT(config, target_length=target_length)
    )
    return model.eval()


__all__ = [
    "CONFIGS",
    "DEFAULT_CONFIG",
    "EAT",
    "EATConfig",
    "build",
    "filter_state",
    "from_checkpoint",
    "sincos_positions",
]
