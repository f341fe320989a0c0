"""EAT (Efficient Audio Transformer): the data2vec 2.0 image-modality encoder run on log-mel patches.

Front-end (as the authors' feature-extraction script): ``wave - wave.mean()`` over the clip's own
samples, Kaldi fbank (128 mel bins, Hanning window, 25 ms / 10 ms), zero-padded or cut to
``target_length`` frames, THEN normalised with ``(x + 4.268) / (2 * 4.569)`` (so padded frames carry
the normalised value of 0, exactly as in the official code).

Encoder: a 16x16 Conv2d patch embedding (``local_encoder.proj``) over the ``[T, 128]`` image, flattened
time-major (token ``t * 8 + f``), fixed 2-D sin-cos ``positions`` added, a CLS token
(``extra_tokens``) prepended, a LayerNorm (``pre_norm``, fairseq's ``context_encoder.norm``), then
post-LN blocks ``r = norm1(x + attn(x)); x = norm2(r + mlp(r))`` with a fused ``attn.qkv``.

Padded frames are attended exactly as in the official code (a batch of clips therefore gives each
clip the result of running it alone); the returned padding mask only marks the patch tokens that
come from padding alone, so pooling can ignore them.

Checkpoints: the official fairseq ``.pt`` files (pre-trained ``data2vec_multi`` and fine-tuned
``mae_image_classification``) and the Hugging Face folders (``config.json`` + ``model.safetensors``).
Pre-training-only parts (the decoder, the EMA teacher) and a fine-tuned classification head are
dropped; every other key must be present with its exact shape.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kit import frontends
from kit.backbones import Backbone, CheckpointError

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


def sincos_positions(embed_dim: int, time_patches: int, freq_patches: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table of the official code, ``[1, time * freq, D]`` in token order:
    the first half of the channels encodes the frequency index, the second half the time index."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(index: torch.Tensor) -> torch.Tensor:
        angles = index.double()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    time_index = torch.arange(time_patches).repeat_interleave(freq_patches)
    freq_index = torch.arange(freq_patches).repeat(time_patches)
    return torch.cat([encode(freq_index), encode(time_index)], dim=1).float()[None]


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # [B, 1, T, F] -> [B, D, T/16, F/16] -> [B, T/16 * F/16, D], time-major as in the official code.
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN transformer block (data2vec 2.0 ``AltBlock`` with ``layer_norm_first=False``)."""

    def __init__(self, config: EATConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.attn = Attention(dim, config.num_heads, config.qkv_bias)
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm1(x + self.attn(x))
        return self.norm2(residual + self.mlp(residual))


class EAT(Backbone):
    name = "eat"
    # Attention projections of the blocks only: the patch Conv2d is also called ``proj``.
    lora_target_modules = r"blocks\.\d+\.attn\.(qkv|proj)"

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
        self.embed_dim = config.embed_dim
        self.freq_patches = N_MELS // config.patch_size
        self.local_encoder = PatchEmbed(config.embed_dim, config.patch_size)
        self.register_buffer(
            "positions", sincos_positions(config.embed_dim, config.max_length, self.freq_patches)
        )
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        nn.init.normal_(self.extra_tokens, std=0.02)
        self.pre_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))

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
        fbank, n_frames = frontends.kaldi_fbank(
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
        features = fbank.new_zeros(fbank.shape[0], self.target_length, N_MELS)
        features[:, :kept] = fbank[:, :kept]
        features = (features - FBANK_MEAN) / (2 * FBANK_STD)
        return features[:, None], n_frames.clamp(max=self.target_length)

    def forward(
        self, waves: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``waves [B, T]`` -> (tokens ``[B, 1 + N, D]`` CLS first, padding mask ``[B, 1 + N]``)."""
        features, n_frames = self.frontend(waves, lengths)
        features = self.augment_features(features, n_frames)
        return self.encode(features), self.padding_mask(n_frames)

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


# ----------------------------------------------------------------------------- checkpoint loading

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


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _config_from_fields(fields: dict, source: Path) -> EATConfig:
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
        raise CheckpointError(f"{source}: EAT config lacks the field {err.args[0]!r}") from err
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
            f"{source}: EAT variant not supported (released EAT models use post-LN blocks, affine norms, "
            f"no prenet, no ALiBi, fixed positions and one CLS token); offending fields: "
            f"{flagged or ['num_extra_tokens']}"
        )
    return config


def _foreign_backbone(fields: object, keys: list[str]) -> str | None:
    """Name of the other backbone a checkpoint belongs to, from its config fields and keys."""
    fields = fields if isinstance(fields, dict) else {}
    image = fields.get("modalities", {}).get("image", {})
    if "band_width" in fields or "band_width" in image or fields.get("model_type") == "fisher":
        return "fisher"
    if "encoder_layers" in fields or any(k.startswith("encoder.layers.") for k in keys):
        return "beats"
    return None


def _wrong_backbone(path: Path, other: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is a {other.upper()} checkpoint, not EAT: load it with kit.backbones.load({other!r}, ...)"
    )


# What torch.load raises on damaged or foreign files.
_READ_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, AttributeError)


def _torch_load(path: Path) -> object:
    """Load a fairseq ``.pt`` without running its pickled code. Training bookkeeping in the official
    files (meters, numpy scalars, enums) refers to classes that are not installed here; they are
    replaced by inert placeholders, since only ``cfg`` and the tensors of ``model`` are read."""

    class Placeholder:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __setstate__(self, state) -> None:
            pass

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except _READ_ERRORS:  # the legacy format, or damaged: torch.load below tells which
        unsafe = []
    try:
        with torch.serialization.safe_globals([(Placeholder, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as err:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint (corrupt or not a .pt file): {err}"
        ) from err


def _fairseq_state(path: Path) -> tuple[EATConfig, dict[str, torch.Tensor]]:
    loaded = _torch_load(path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict) or "cfg" not in loaded:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (expected a dict with 'cfg' and 'model')")
    cfg, weights = loaded["cfg"], loaded["model"]
    model_fields = cfg.get("model") if isinstance(cfg, dict) else None
    foreign = _foreign_backbone(model_fields if isinstance(model_fields, dict) else cfg, list(weights))
    if foreign:
        raise _wrong_backbone(path, foreign)
    if not isinstance(model_fields, dict):
        raise CheckpointError(
            f"{path}: 'cfg' has no 'model' section, so this is not an EAT fairseq checkpoint"
        )
    if "pretrained_model_args" in model_fields:
        # A fine-tuned model: the encoder's config is the pre-training one, its weights sit under ``model.``.
        pretrained = model_fields["pretrained_model_args"] or {}
        model_fields = pretrained.get("model", {})
        weights = {k.removeprefix("model."): v for k, v in weights.items() if not _CLASSIFIER_HEAD.match(k)}
    config = _config_from_fields(model_fields, path)
    state = {
        _rename(key, _FAIRSEQ_RENAMES): value
        for key, value in weights.items()
        if not _PRETRAINING_ONLY.match(key)
    }
    return config, state


def _hf_state(folder: Path) -> tuple[EATConfig, dict[str, torch.Tensor]]:
    config_file, weights_file = folder / "config.json", folder / "model.safetensors"
    absent = [p.name for p in (config_file, weights_file) if not p.is_file()]
    if absent:
        raise CheckpointError(
            f"{folder}: a Hugging Face EAT folder needs config.json and model.safetensors; missing {absent}"
        )
    try:
        fields = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON: {err}") from err
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {weights_file} (corrupt or not safetensors): {err}") from err
    foreign = _foreign_backbone(fields, list(weights))
    if foreign:
        raise _wrong_backbone(folder, foreign)
    config = _config_from_fields(fields, folder)
    state = {}
    for key, value in weights.items():
        if _CLASSIFIER_HEAD.match(key):
            continue
        state[_rename(key.removeprefix("model."), _HF_RENAMES)] = value
    return config, state


def _check_state(model: EAT, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: EAT keys do not match; missing {missing}, unexpected {unexpected}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)} for this EAT config"
            )


def from_checkpoint(path: str | Path, target_length: int = 1024) -> EAT:
    """Load released EAT weights from a fairseq ``.pt`` file or a Hugging Face folder, exactly."""
    path = Path(path)
    if path.is_dir():
        config, state = _hf_state(path)
    elif path.is_file():
        config, state = _fairseq_state(path)
    else:
        raise FileNotFoundError(f"EAT checkpoint not found: {path}")
    model = EAT(config, target_length=target_length)
    _check_state(model, state, path)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


__all__ = ["CONFIGS", "DEFAULT_CONFIG", "EAT", "EATConfig", "build", "from_checkpoint", "sincos_positions"]
