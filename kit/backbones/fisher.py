"""FISHER (Fan, Jiang et al. 2025, arXiv 2507.16696): sub-band ViT over a log-magnitude STFT.

FISHER is a data2vec-2.0 / EAT style image-modality encoder applied to a linear-frequency spectrum
that is first cut into fixed-width sub-bands. Each band is encoded on its own by the same encoder and
its CLS output is kept, so a clip gives one D-dim vector per band; their concatenation is FISHER's
official clip embedding.

Front-end (the authors' inference code), per clip, at 16 kHz:
``wave - wave.mean()`` over the clip's valid samples, a magnitude STFT (``n_fft`` 25 ms = 400,
hop 10 ms = 160, periodic Hann window, ``center=False``: exactly
``torchaudio.transforms.Spectrogram(n_fft, hop_length=hop, power=1, center=False)``, computed with
its functional form so the window is not saved in the state dict), ``log(|X| + 1e-10)``, time x freq,
then ``(x + 3.0173) / (2 * 2.1532)``. At 16 kHz the spectrum has 201 bins: two 100-bin bands.

Encoder, per band ``[T, band_width]``: a 16x16 Conv2d patch embedding (time x freq patches), tokens
flattened time-major (``flatten='freq'``: frequency varies fastest) or freq-major (``'time'``),
the first N rows of a fixed 2-D sin-cos position table of ``max_length x max_freq`` patches added
(the table is indexed by token number, as the authors do, not by the patch's grid cell), a CLS token
prepended, LayerNorm, then the blocks (post-LN in every release); the layers are the ones EAT shares
(:mod:`kit.backbones.layers`), the position table computed in float32 as the authors do.

Two paths, chosen by ``pad_to``; they give DIFFERENT embeddings for clips shorter than 1024 frames:

- ``pad_to=None``: the FISHER README's path. The spectrum as is, the whole clip (the README's
  script also cuts it to 1024 frames = 10.24 s, which drops the end of a 16-s clip: ``max_frames=1024``
  does that); in a zero-padded batch the padded time patches are masked as attention keys, so each
  clip gets exactly its single-clip output.
- ``pad_to=1024`` (or another frame count): the authors' RMIS benchmark path. The normalised
  spectrum is zero-padded (or cut) to ``pad_to`` frames first, and the padding is attended to as
  content, as in their code. Every clip is padded on its own, so a batch needs no mask.

Checkpoints: the released ``.pt`` files, ``{"cfg": {"model": {...}}, "model": state_dict}`` (the files
the FISHER README links), and the Hugging Face repos (``jiangab/FISHER-{tiny,mini,small}-0723``: a folder
with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``; the configuration is read at the
top level of ``config.json`` or under ``cfg`` / ``model`` / ``cfg.model``, and weights saved by a wrapper
module under one name prefix, such as ``model.``, lose it). The number of heads comes from the
configuration (the weights do not tell it). :func:`filter_state` maps the release key names onto this
module's names explicitly; :mod:`kit.backbones.loading` checks them strictly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from torch.utils.checkpoint import checkpoint

from kit.backbones import Backbone, CheckpointError, loading
from kit.backbones.layers import Block, sincos_positions

SAMPLE_RATE = 16000
SPEC_OFFSET = 3.017344307886898  # the authors' normalisation: (x + offset) / scale
SPEC_SCALE = 2 * 2.1531635155379805
LOG_FLOOR = 1e-10
README_MAX_FRAMES = 1024  # the README cuts longer spectra to 1024 frames (10.24 s): max_frames=1024


@dataclass(frozen=True)
class FisherConfig:
    """Architecture of one FISHER model (field names follow the release ``cfg``)."""

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    band_width: int = 100  # frequency bins per sub-band
    patch_size: int = 16
    max_length: int = 128  # time patches in the position table
    max_freq: int = 50  # frequency patches in the position table
    flatten: str = "freq"  # 'freq': time-major token order; 'time': freq-major
    layer_norm_first: bool = False  # False: post-LN blocks (every release)
    norm_eps: float = 1e-6
    norm_affine: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of 4 (2-D sin-cos positions)")
        if self.flatten not in ("freq", "time"):
            raise ValueError(f"flatten {self.flatten!r}: expected 'freq' or 'time'")
        if self.band_width < self.patch_size:
            raise ValueError(f"band_width {self.band_width} is narrower than one patch ({self.patch_size})")


# Release sizes (ViT-tiny/-mini/-small widths, 12 blocks). Parameters without the fixed position
# table: tiny 5.4 M, mini 9.5 M, small 21.4 M (the release note says 5.5 M to 22 M).
CONFIGS = {
    "tiny": FisherConfig(embed_dim=192, depth=12, num_heads=3),
    "mini": FisherConfig(embed_dim=256, depth=12, num_heads=4),
    "small": FisherConfig(embed_dim=384, depth=12, num_heads=6),
    "cpu": FisherConfig(embed_dim=96, depth=4, num_heads=3),
    "unit": FisherConfig(embed_dim=32, depth=2, num_heads=2),  # unit tests
}
DEFAULT_CONFIG = "cpu"
# The released sizes and their configuration (kit.tools.bench benchmarks these).
RELEASES = {f"FISHER-{size}": {"config": size} for size in ("tiny", "mini", "small")}


class Fisher(Backbone):
    """FISHER: ``forward(waves [B, S], lengths [B]) -> (band CLS tokens [B, n_bands, D], mask [B, n_bands])``.

    ``pad_to=None`` is the README path (spectrum as is, padded patches masked in a batch; with
    ``max_frames`` cut to that many frames); ``pad_to=1024`` is the RMIS benchmark path (spectrum
    zero-padded to 1024 frames, padding attended).
    """

    name = "fisher"
    has_grid = True  # grid_tokens: the band encoders' patch outputs

    def __init__(
        self, config: FisherConfig, pad_to: int | None = None, max_frames: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.lora_target_modules = r"blocks\.\d+\.attn\.(qkv|proj)"
        self.n_fft = 25 * SAMPLE_RATE // 1000
        self.hop_length = 10 * SAMPLE_RATE // 1000
        self.n_bands = (self.n_fft // 2 + 1) // config.band_width
        if self.n_bands == 0:
            raise ValueError(f"band_width {config.band_width} exceeds the {self.n_fft // 2 + 1} STFT bins")
        self.freq_patches = config.band_width // config.patch_size
        self.pad_to = self._checked_frames("pad_to", pad_to)
        self.max_frames = self._checked_frames("max_frames", max_frames)
        if pad_to is not None and max_frames is not None:
            raise ValueError("pad_to and max_frames exclude each other: pad_to already fixes the frame count")

        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        dim = config.embed_dim
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        # The authors compute the table in float32 (a released checkpoint brings its own copy).
        self.register_buffer(
            "positions", sincos_positions(dim, config.max_length, config.max_freq, dtype=np.float32)
        )
        norm = lambda: nn.LayerNorm(dim, eps=config.norm_eps, elementwise_affine=config.norm_affine)
        # Post-LN models normalise the tokens before the blocks, pre-LN models after them.
        self.pre_norm = None if config.layer_norm_first else norm()
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.num_heads,
                config.mlp_ratio,
                norm_eps=config.norm_eps,
                norm_affine=config.norm_affine,
                layer_norm_first=config.layer_norm_first,
            )
            for _ in range(config.depth)
        )
        self.norm = norm() if config.layer_norm_first else None
        self._init_weights()

    def _checked_frames(self, what: str, frames: int | None) -> int | None:
        if frames is None:
            return None
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"{what} {frames!r}: expected None or a positive number of frames (e.g. 1024)")
        tokens = frames // self.config.patch_size * self.freq_patches
        table = self.config.max_length * self.config.max_freq
        if tokens > table:
            raise ValueError(
                f"{what} {frames} gives {tokens} patches per band, more than the {table} positions"
            )
        return frames

    @property
    def max_input_seconds(self) -> float | None:
        """Input past this is cut off (``pad_to`` or ``max_frames`` frames of 10 ms); None: any length."""
        frames = self.pad_to or self.max_frames
        return None if frames is None else frames / 100.0

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)  # as MAE; trunc_normal_ is slow on CPU
                nn.init.zeros_(module.bias)
        # As the authors: Xavier on the flattened patch kernel, a unit-normal CLS token.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.embed_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token)

    def _checked_input(self, waves: torch.Tensor, lengths) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_tensor(waves) or waves.dim() != 2:
            shape = tuple(waves.shape) if torch.is_tensor(waves) else type(waves).__name__
            raise ValueError(f"FISHER expects waves of shape [batch, samples] at 16 kHz, got {shape}")
        if not torch.isfinite(waves).all():
            raise ValueError("FISHER input waves contain NaN or infinite samples")
        batch, samples = waves.shape
        if lengths is None:
            lengths = torch.full((batch,), samples, dtype=torch.long, device=waves.device)
        lengths = torch.as_tensor(lengths, device=waves.device).long()
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
        if (lengths > samples).any():
            raise ValueError(f"lengths {lengths.tolist()} exceed the {samples} samples of the waves")
        if (lengths < self.n_fft).any():
            raise ValueError(
                f"lengths {lengths.tolist()}: every clip needs at least {self.n_fft} samples "
                f"(one {self.n_fft * 1000 // SAMPLE_RATE} ms STFT window)"
            )
        return waves.float(), lengths

    def frontend(self, waves: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-magnitude spectrum ``[B, T, 201]`` and each clip's frame count ``[B]``.

        Frames past a clip's own count (those that touch padding) are zero."""
        waves, lengths = self._checked_input(waves, lengths)
        valid = torch.arange(waves.shape[1], device=waves.device) < lengths[:, None]
        mean = (waves * valid).sum(1, keepdim=True) / lengths[:, None]
        centred = torch.where(valid, waves - mean, 0.0)
        magnitude = torchaudio.functional.spectrogram(
            centred,
            pad=0,
            window=self.window.float(),  # stays float32 when the model is cast to half precision
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            power=1.0,
            normalized=False,
            center=False,
        )
        spec = (torch.log(magnitude + LOG_FLOOR).transpose(1, 2) + SPEC_OFFSET) / SPEC_SCALE
        frames = (lengths - self.n_fft) // self.hop_length + 1
        past_end = torch.arange(spec.shape[1], device=spec.device) >= frames[:, None]
        return spec.masked_fill(past_end[:, :, None], 0.0), frames

    def _fit_frames(self, spec: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the chosen path: README cut, or pad/cut to ``pad_to`` with the padding kept as content."""
        if self.pad_to is None:
            if self.max_frames is None:
                return spec, frames
            return spec[:, : self.max_frames], frames.clamp(max=self.max_frames)
        spec = F.pad(spec, (0, 0, 0, max(0, self.pad_to - spec.shape[1])))[:, : self.pad_to]
        return spec, torch.full_like(frames, self.pad_to)

    def _band_patches(self, spec: torch.Tensor) -> torch.Tensor:
        """``[B, T, F]`` -> patch tokens ``[B * n_bands, N, D]``, bands folded into the batch (clip-major)."""
        batch, frames, _ = spec.shape
        width = self.config.band_width
        bands = spec[:, :, : self.n_bands * width].reshape(batch, frames, self.n_bands, width)
        bands = bands.permute(0, 2, 1, 3).reshape(batch * self.n_bands, 1, frames, width)
        grid = self.patch_embed(bands.to(self.patch_embed.weight.dtype))  # [B * n_bands, D, T/p, F/p]
        if self.config.flatten == "time":
            grid = grid.transpose(-2, -1)
        return grid.flatten(2).transpose(1, 2)

    def _attention_mask(self, frames: torch.Tensor, time_patches: int) -> torch.Tensor | None:
        """Boolean key mask ``[B * n_bands, 1, 1, 1 + N]`` (True = attend), or None when nothing is padded.

        A time patch counts only if all its frames are the clip's own, as a single-clip run would
        drop a partial last patch."""
        own_patches = frames // self.config.patch_size
        if bool((own_patches >= time_patches).all()):
            return None
        time_valid = torch.arange(time_patches, device=frames.device) < own_patches[:, None]
        token_valid = time_valid[:, :, None].expand(-1, -1, self.freq_patches)
        if self.config.flatten == "time":
            token_valid = token_valid.transpose(1, 2)
        token_valid = F.pad(token_valid.flatten(1), (1, 0), value=True)  # the CLS token
        return token_valid.repeat_interleave(self.n_bands, dim=0)[:, None, None, :]

    def encode(self, spec: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Per-band CLS outputs ``[B, n_bands, D]`` of a (path-fitted) spectrum ``[B, T, F]``."""
        return self._encode_bands(spec, frames)[:, 0].reshape(spec.shape[0], self.n_bands, self.embed_dim)

    def _encode_bands(self, spec: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Every output token of every band, ``[B * n_bands, 1 + N, D]`` (CLS first, bands folded into
        the batch clip-major, patches in the ``flatten`` order), of a path-fitted spectrum ``[B, T, F]``."""
        x = self._band_patches(spec)
        tokens = x.shape[1]
        if tokens > self.positions.shape[1]:
            raise ValueError(
                f"{spec.shape[1]} frames give {tokens} patches per band, more than the "
                f"{self.positions.shape[1]} positions of this model"
            )
        x = x + self.positions[:, :tokens].to(x.dtype)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        attend = self._attention_mask(frames, spec.shape[1] // self.config.patch_size)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attend, use_reentrant=False)
            else:
                x = block(x, attend)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def forward(
        self, waves: torch.Tensor, lengths=None, augment=None, reference=None, reference_lengths=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``augment(spec, frames)`` is applied to the path-fitted spectrum in training mode."""
        self._no_reference(reference)
        spec, frames = self._fit_frames(*self.frontend(waves, lengths))
        spec = self._augmented(spec, frames, augment)
        tokens = self.encode(spec, frames)
        return tokens, torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def grid_tokens(
        self, waves: torch.Tensor, lengths=None, reference=None, reference_lengths=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The band encoders' patch outputs on one time x frequency grid: ``(tokens [B, T, n_bands *
        freq_patches, D], padding_mask [B, T])``, T the time patches (16 frames), the frequency axis
        each band's ``band_width // 16`` patches (16 STFT bins each; the conv drops a band's last
        ``band_width % 16`` bins), band after band, low to high: 2 x 6 = 12 at 16 kHz.

        Why this grid and not the bands alone: each band is encoded as a [time, frequency] patch
        image, so its patch outputs keep frequency inside the band as BEATs' keep it across the
        mel axis; ``forward``'s band CLS tokens summarise each band over time (a grid with T = 1).

        Mask: on the README path (``pad_to=None``) the time patches past a clip's own whole patches
        (what a single-clip run would not have); on the ``pad_to`` path, where padding is attended
        as content, the time patches that hold padding alone."""
        self._no_reference(reference)
        spec, own = self.frontend(waves, lengths)
        fitted, frames = self._fit_frames(spec, own)
        patch = self.config.patch_size
        x = self._encode_bands(fitted, frames)[:, 1:]
        time_patches, bands, freq_patches = fitted.shape[1] // patch, self.n_bands, self.freq_patches
        if self.config.flatten == "time":  # freq-major tokens: f * T + t
            x = x.reshape(-1, bands, freq_patches, time_patches, self.embed_dim).transpose(2, 3)
        grid = x.reshape(-1, bands, time_patches, freq_patches, self.embed_dim).transpose(1, 2)
        grid = grid.reshape(-1, time_patches, bands * freq_patches, self.embed_dim)
        index = torch.arange(time_patches, device=own.device)[None, :]
        if self.pad_to is None:
            return grid, index >= (frames // patch)[:, None]
        return grid, index * patch >= own.clamp(max=self.pad_to)[:, None]

    def embedding(self, waves: torch.Tensor, lengths=None) -> torch.Tensor:
        """FISHER's official clip embedding: the band CLS outputs concatenated, ``[B, n_bands * D]``."""
        return self(waves, lengths)[0].flatten(1)


def build(config_name: str, pad_to: int | None = None, max_frames: int | None = None, **options) -> Fisher:
    """Random-initialised FISHER of a named size; ``options`` override :class:`FisherConfig` fields."""
    if config_name not in CONFIGS:
        raise ValueError(
            f"unknown FISHER config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}"
        )
    fields = {f.name for f in dataclasses.fields(FisherConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"unknown FISHER option(s) {unknown}: expected pad_to, max_frames or one of {sorted(fields)}"
        )
    return Fisher(dataclasses.replace(CONFIGS[config_name], **options), pad_to=pad_to, max_frames=max_frames)


# ----------------------------------------------------------------------------- checkpoint filter

# Release name prefix -> this module's name prefix.
_RELEASE_NAMES = (
    ("modality_encoders.IMAGE.local_encoder.proj.", "patch_embed."),
    ("modality_encoders.IMAGE.extra_tokens", "cls_token"),
    ("modality_encoders.IMAGE.fixed_positional_encoder.positions", "positions"),
    ("modality_encoders.IMAGE.context_encoder.norm.", "pre_norm."),
)


def _release_config(model_cfg: dict) -> FisherConfig:
    """The architecture in a FISHER release's ``cfg['model']``; refuses variants this module lacks."""
    image = model_cfg.get("modalities", {}).get("image", {})
    embed_dim = int(model_cfg.get("embed_dim", 768))
    unsupported = {
        "num_extra_tokens": (image.get("num_extra_tokens", 1), 1),
        "in_chans": (image.get("in_chans", 1), 1),
        "prenet_depth": (image.get("prenet_depth", 0), 0),
        "use_alibi_encoder": (image.get("use_alibi_encoder", False), False),
        "fixed_positions": (image.get("fixed_positions", True), True),
        "modalities.image.embed_dim": (image.get("embed_dim", embed_dim), embed_dim),
    }
    for field, (value, expected) in unsupported.items():
        if value != expected:
            raise CheckpointError(f"cfg {field}={value!r} is not supported (released FISHER: {expected!r})")
    try:
        return FisherConfig(
            embed_dim=embed_dim,
            depth=int(model_cfg.get("depth", 12)),
            num_heads=int(model_cfg.get("num_heads", 12)),
            mlp_ratio=float(model_cfg.get("mlp_ratio", 4.0)),
            band_width=int(model_cfg["band_width"]),
            patch_size=int(image.get("patch_size", 16)),
            max_length=int(image.get("max_length", 128)),
            max_freq=int(image.get("max_freq", 50)),
            flatten=str(image.get("flatten", "freq")),
            layer_norm_first=bool(model_cfg.get("layer_norm_first", False)),
            norm_eps=float(model_cfg.get("norm_eps", 1e-6)),
            norm_affine=bool(model_cfg.get("norm_affine", True)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"inconsistent FISHER cfg: {err}") from err


LAYOUTS_HELP = (
    "FISHER loads the release .pt file ({'cfg': {'model': {...}}, 'model': state_dict}, the file the FISHER "
    "README links) or a Hugging Face folder (config.json holding that cfg['model'] + model.safetensors or "
    "pytorch_model.bin with the release's weight names, optionally under one prefix such as 'model.'); "
    "another layout converts with torch.save({'cfg': {'model': cfg}, 'model': state_dict}, 'fisher.pt')"
)
_RELEASE_ROOTS = ("modality_encoders.", "blocks.")  # where the release's weight names start


def _hf_model_cfg(fields: dict) -> dict:
    """The release's ``cfg['model']`` in a Hugging Face ``config.json``: at its top level (the fields of a
    ``PretrainedConfig``) or nested under ``cfg``, ``model`` or ``cfg.model``."""
    for path in ((), ("cfg",), ("model",), ("cfg", "model")):
        node = fields
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and "band_width" in node:
            return node
    raise CheckpointError(
        "config.json holds no FISHER configuration (no 'band_width' at its top level nor under 'cfg', "
        f"'model' or 'cfg.model'; an EAT folder loads with kit.backbones.load('eat', ...)). {LAYOUTS_HELP}"
    )


def _release_names(weights: dict) -> dict:
    """Weights saved by a wrapper module (``model.blocks.0....``) under the release's names: one prefix
    shared by every key, ending where the first release name starts, is dropped."""
    if all(str(key).startswith(_RELEASE_ROOTS) for key in weights):
        return dict(weights)
    for key in map(str, weights):
        starts = [key.find("." + root) + 1 for root in _RELEASE_ROOTS if "." + root in key]
        if starts:
            prefix = key[: min(starts)]
            if all(str(k).startswith(prefix) for k in weights):
                return {str(k)[len(prefix) :]: v for k, v in weights.items()}
            break
    return dict(weights)  # the strict load names the keys that do not fit


def filter_state(raw: object) -> tuple[FisherConfig, dict]:
    """A read release file (``{"cfg": {"model": {...}}, "model": state_dict}``) or Hugging Face folder
    (``{"config.json": fields, "model.safetensors": weights}``) -> (config, state dict in this module's
    names). The number of heads comes from the configuration (the weights do not tell it); BEATs and
    EAT files are recognised and refused by name."""
    if isinstance(raw, dict) and loading.HF_CONFIG in raw and loading.HF_WEIGHTS in raw:
        model_cfg = _hf_model_cfg(raw[loading.HF_CONFIG])
        state = _release_names(raw[loading.HF_WEIGHTS])
        return _release_config(model_cfg), {
            loading.rename_prefix(key, _RELEASE_NAMES): value for key, value in state.items()
        }
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise CheckpointError(
            f"not a FISHER checkpoint (expected a dict with 'cfg' and 'model'). {LAYOUTS_HELP}"
        )
    state = raw["model"]
    cfg = raw.get("cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        family = (
            "a BEATs checkpoint" if any(str(k).startswith("encoder.layers.") for k in state) else "not FISHER"
        )
        raise CheckpointError(f"{family} (no cfg['model'] section); FISHER files hold cfg['model']")
    if "band_width" not in cfg["model"]:
        raise CheckpointError(
            "cfg['model'] has no 'band_width': an EAT/data2vec checkpoint, not FISHER "
            "(load it with kit.backbones.load('eat', ...))"
        )
    return _release_config(cfg["model"]), {
        loading.rename_prefix(key, _RELEASE_NAMES): value for key, value in state.items()
    }


def from_checkpoint(
    path: str | os.PathLike, pad_to: int | None = None, max_frames: int | None = None
) -> Fisher:
    """Load a released FISHER ``.pt`` file (or a folder holding one, or a Hugging Face folder) exactly,
    strict key check."""
    return loading.load_checkpoint(
        path, "FISHER", filter_state, lambda config: Fisher(config, pad_to=pad_to, max_frames=max_frames)
    )
