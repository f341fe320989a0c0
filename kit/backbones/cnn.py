"""A compact dual-input CNN trained from scratch: the pre-foundation-model method of strong DCASE systems.

Before pretrained audio transformers, the best DCASE ASD systems trained a small network from random
initialisation on the normal training clips alone, with an auxiliary classification of the clips'
machine / section / attribute labels (outlier exposure) under an angular-margin loss, then scored
embeddings by distance (Wilkinghoff's dual-input networks: a CNN on the log-mel spectrogram beside a
1-D CNN on the magnitude spectrum of the whole clip). This module is such a network behind the
backbone interface, so ``kit.train`` trains it with any head, loss and label scheme, e.g.
``TrainConfig(backbone="cnn", head="mean", loss="arcface", label_scheme="composite", ...)``.

Two branches, both from the same waves:

- **spectrogram branch**: log-mel (``n_mels`` bands, power STFT with ``center=False``, dB), a
  per-band BatchNorm (a fixed affine map at inference), SpecAugment (``forward``'s ``augment``, training
  only), then ``len(channels)`` residual stages (two 3x3 convs with BatchNorm and ReLU, a 1x1
  shortcut where the width changes, 2x2 max-pooling), each halving time and frequency; each
  remaining time step's ``channels[-1] x frequency`` map is projected to ``token_dim``: one token
  per ``hop_length * 2**stages`` samples;
- **spectrum branch** (``spectrum_dim > 0``): the mean power spectrum of the clip over
  ``spectrum_n_fft``-point frames (fine frequency resolution: narrow harmonics, tonal faults), in dB,
  per-bin BatchNorm, a strided 1-D CNN over frequency and a linear map to ``spectrum_dim``: one vector
  per clip, appended to every token (the head's pooling then passes it through unchanged by the mean).

Tokens are ``[B, N, token_dim + spectrum_dim]``.

Padding policy: batch invariant at inference. Each clip's STFT frames lie inside the clip
(``center=False``), time steps past a clip's own count are zeroed before every convolution (what
the zero padding of a single-clip run holds), max-pooling keeps ``floor(n / 2)`` steps, and the mean
spectrum averages a clip's own frames only; so a clip's valid tokens are the same alone as in a
zero-padded batch. BatchNorm uses batch statistics in training mode and fixed running statistics in
eval mode; the input normalisation takes its training statistics from valid frames only, the stages'
BatchNorms from every time step of the batch (padding enters them only when a clip is shorter than
the training crop, so keep ``crop_seconds`` at most the shortest clip).

``blocks`` are the residual stages (partial fine-tuning trains the last ones; the spectrum branch and
the input normalisation stay frozen there); LoRA targets the stages' 3x3 convolutions. Gradient
checkpointing is not implemented (activations are small; re-running BatchNorm would update its
running statistics twice): the flag is accepted and a warning says it is ignored.

Weights: ``build(config)`` gives random initialisation (no "no pretrained weights" warning: training
from scratch is this backbone's purpose); ``kit.train`` saves and reloads trained weights through
its ``model.pt``. ``from_checkpoint`` loads the backbone part of such a ``model.pt`` (or a file written
by :func:`save`), e.g. to embed with a trained CNN under another head or to continue training it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from kit.backbones import Backbone, CheckpointError, loading
from kit.features import (
    POWER_FLOOR,
    SAMPLE_RATE,
    check_waves,
    frame_counts,
    masked_log_mel,
    power_frames,
)


@dataclass(frozen=True)
class CnnConfig:
    """Architecture and front-end of the from-scratch CNN."""

    n_mels: int = 128
    n_fft: int = 1024
    hop_length: int = 512
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one residual stage each; every stage halves T and F
    token_dim: int = 128
    spectrum_dim: int = 64  # 0: no spectrum branch
    spectrum_n_fft: int = 4096
    spectrum_channels: tuple[int, ...] = (16, 32, 64)
    spectrum_kernel: int = 64  # first 1-D conv over frequency bins: kernel and stride
    spectrum_stride: int = 16

    def __post_init__(self) -> None:
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive widths, got {self.channels}")
        if self.n_mels < 2 ** len(self.channels):
            raise ValueError(
                f"{len(self.channels)} stages halve the {self.n_mels} mel bands to nothing: "
                f"need n_mels >= {2 ** len(self.channels)}"
            )
        if self.token_dim < 1 or self.spectrum_dim < 0:
            raise ValueError(
                f"token_dim must be >= 1 and spectrum_dim >= 0, got {self.token_dim}, {self.spectrum_dim}"
            )
        if self.spectrum_dim:
            bins = self.spectrum_n_fft // 2 + 1
            if not self.spectrum_channels or min(self.spectrum_channels) < 1:
                raise ValueError(f"spectrum_channels must be positive widths, got {self.spectrum_channels}")
            if _spectrum_positions(self) < 1:
                raise ValueError(
                    f"the spectrum branch reduces {bins} bins to nothing (kernel {self.spectrum_kernel}, "
                    f"stride {self.spectrum_stride}, {len(self.spectrum_channels)} poolings)"
                )


def _spectrum_positions(config: CnnConfig) -> int:
    """Frequency positions left after the spectrum branch's strided conv and its max-poolings."""
    positions = (config.spectrum_n_fft // 2 + 1 - config.spectrum_kernel) // config.spectrum_stride + 1
    for _ in config.spectrum_channels[1:]:
        positions //= 2
    return positions


CONFIGS = {
    "cpu": CnnConfig(),  # ~0.6 M parameters; trains in minutes on two CPU cores
    "cpu_nospectrum": CnnConfig(spectrum_dim=0),  # the spectrogram branch alone
    "wide": CnnConfig(channels=(32, 64, 128, 256), token_dim=256, spectrum_dim=128),  # GPU size
    "unit": CnnConfig(
        n_mels=16,
        n_fft=256,
        hop_length=128,
        channels=(4, 8),
        token_dim=8,
        spectrum_dim=4,
        spectrum_n_fft=512,
        spectrum_channels=(4, 4),
        spectrum_kernel=16,
        spectrum_stride=8,
    ),  # unit tests
}
DEFAULT_CONFIG = "cpu"


class MaskedBandNorm(nn.BatchNorm1d):
    """BatchNorm of each band of ``[B, T, bands]`` whose training statistics come from each clip's
    own frames only (``valid [B, T]``): padded frames (0 dB) would pull the band means far off."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.training:
            weights = valid[:, :, None].to(x.dtype)
            count = weights.sum()
            mean = (x * weights).sum(dim=(0, 1)) / count
            var = ((x - mean).square() * weights).sum(dim=(0, 1)) / count
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class MaskedStage(nn.Module):
    """Residual stage over ``[B, C, T, F]``: conv-BN-ReLU-conv-BN + shortcut, ReLU, 2x2 max-pool.

    ``valid [B, T]`` marks each clip's own time steps; every convolution's input is zeroed outside
    them, as a single-clip run's zero padding would be. Returns the pooled map and its ``valid``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = valid[:, None, :, None].to(x.dtype)
        x = x * keep
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y * keep))
        x = F.relu(y + self.shortcut(x))
        n_valid = valid.sum(dim=1) // 2
        x = F.max_pool2d(x, 2)
        return x, torch.arange(x.shape[2], device=x.device) < n_valid[:, None]


class SpectrumBranch(nn.Module):
    """Mean power spectrum of a clip (dB) -> per-bin BatchNorm -> strided 1-D CNN -> ``[B, dim]``."""

    def __init__(self, config: CnnConfig) -> None:
        super().__init__()
        self.n_fft, self.hop_length = config.spectrum_n_fft, config.spectrum_n_fft // 2
        self.register_buffer("window", torch.hann_window(self.n_fft))
        self.norm = nn.BatchNorm1d(self.n_fft // 2 + 1)
        widths = config.spectrum_channels
        layers = [
            nn.Conv1d(1, widths[0], config.spectrum_kernel, stride=config.spectrum_stride, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv1d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm1d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool1d(2))
        self.convs = nn.Sequential(*layers)
        self.projection = nn.Linear(widths[-1] * _spectrum_positions(config), config.spectrum_dim)

    def mean_spectrum(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, n_fft // 2 + 1]``: dB of each clip's power spectrum averaged over its own frames."""
        power = power_frames(waves, self.window, self.n_fft, self.hop_length)
        frames = frame_counts(lengths, self.n_fft, self.hop_length)
        own = (torch.arange(power.shape[1], device=power.device) < frames[:, None]).to(power.dtype)
        mean = (power * own[:, :, None]).sum(dim=1) / frames[:, None].to(power.dtype)
        return 10.0 * torch.log10(mean + POWER_FLOOR)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.mean_spectrum(waves, lengths).to(self.norm.weight.dtype))
        return self.projection(self.convs(x[:, None]).flatten(1))


class Cnn(Backbone):
    """The dual-input CNN: ``forward(waves [B, S], lengths [B]) -> (tokens [B, N, D], padding_mask [B, N])``."""

    name = "cnn"
    trains_from_scratch = True
    has_grid = True  # grid_tokens: the spectrogram branch's last [time, frequency] map

    def __init__(self, config: CnnConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.token_dim + config.spectrum_dim
        self.lora_target_modules = r"blocks\.\d+\.conv[12]"
        self.register_buffer("window", torch.hann_window(config.n_fft))
        filters = torchaudio.functional.melscale_fbanks(
            config.n_fft // 2 + 1, 0.0, SAMPLE_RATE / 2, config.n_mels, SAMPLE_RATE
        )
        self.register_buffer("mel_filters", filters)
        self.input_norm = MaskedBandNorm(config.n_mels)
        widths = (1,) + tuple(config.channels)
        self.blocks = nn.ModuleList(MaskedStage(a, b) for a, b in zip(widths[:-1], widths[1:]))
        stages = len(config.channels)
        self.token_projection = nn.Linear(config.channels[-1] * (config.n_mels >> stages), config.token_dim)
        self.spectrum = SpectrumBranch(config) if config.spectrum_dim else None
        # Shortest clip: 2**stages frames (one token) and one spectrum frame.
        frames_needed = 2**stages
        self.min_samples = max(
            config.n_fft + (frames_needed - 1) * config.hop_length,
            config.spectrum_n_fft if config.spectrum_dim else 0,
        )

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            warnings.warn(
                "cnn: gradient checkpointing is not implemented (its activations are small); ignored",
                stacklevel=2,
            )

    def frontend(self, waves: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel ``[B, T, n_mels]`` (dB) and each clip's frame count ``[B]``; frames past it are 0."""
        waves, lengths = check_waves(waves, lengths, self.min_samples, "cnn")
        return masked_log_mel(
            waves, lengths, self.window, self.mel_filters, self.config.n_fft, self.config.hop_length
        )

    def _feature_map(self, waves: torch.Tensor, lengths: torch.Tensor, augment=None):
        """The last stage's map ``[B, C, T', F']`` of checked waves and its valid time steps ``[B, T']``."""
        logmel, frames = self.frontend(waves, lengths)
        valid = torch.arange(logmel.shape[1], device=logmel.device) < frames[:, None]
        x = self.input_norm(logmel.to(self.input_norm.weight.dtype), valid)
        x = self._augmented(x * valid[:, :, None].to(x.dtype), frames, augment)  # zeros = the band means
        x = x[:, None]  # [B, 1, T, F]
        for stage in self.blocks:
            x, valid = stage(x, valid)
        return x, valid

    def grid_tokens(
        self, waves: torch.Tensor, lengths=None, reference=None, reference_lengths=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The spectrogram branch's last feature map before the frequency collapse (the token
        projection): ``(tokens [B, T', F', C], padding_mask [B, T'])``, F' = ``n_mels / 2**stages``
        frequency rows (low to high), C = ``channels[-1]``; padded steps are 0. ``forward``'s tokens
        are ``token_projection`` of each step's ``[C x F']`` map. The spectrum branch is left out: its
        one vector per clip comes from a 1-D CNN over frequency collapsed by a linear map, so it has
        no time axis and no frequency rows aligned with the grid's."""
        self._no_reference(reference)
        waves, lengths = check_waves(waves, lengths, self.min_samples, "cnn")
        x, valid = self._feature_map(waves, lengths)
        grid = x.permute(0, 2, 3, 1)  # [B, T', F', C]
        return grid.masked_fill(~valid[:, :, None, None], 0.0), ~valid

    def forward(
        self, waves: torch.Tensor, lengths=None, augment=None, reference=None, reference_lengths=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``augment(features, frames)`` is applied to the normalised log-mel in training mode."""
        self._no_reference(reference)
        waves, lengths = check_waves(waves, lengths, self.min_samples, "cnn")
        x, valid = self._feature_map(waves, lengths, augment)
        tokens = self.token_projection(x.permute(0, 2, 1, 3).flatten(2))  # [B, T', C * F']
        if self.spectrum is not None:
            clip = self.spectrum(waves, lengths).to(tokens.dtype)
            tokens = torch.cat([tokens, clip[:, None].expand(-1, tokens.shape[1], -1)], dim=-1)
        padding = ~valid
        return tokens.masked_fill(padding[:, :, None], 0.0), padding


def _config(config_name: str, options: dict) -> CnnConfig:
    """The named configuration with ``options`` overriding its fields."""
    if config_name not in CONFIGS:
        raise ValueError(f"unknown cnn config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}")
    fields = {f.name for f in dataclasses.fields(CnnConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown cnn option(s) {unknown}: expected some of {sorted(fields)}")
    options = dict(options)
    for key in ("channels", "spectrum_channels"):
        if key in options:
            options[key] = tuple(options[key])  # YAML and JSON give lists
    return dataclasses.replace(CONFIGS[config_name], **options)


def build(config_name: str = DEFAULT_CONFIG, **options) -> Cnn:
    """Random-initialised CNN of a named configuration; ``options`` override :class:`CnnConfig` fields."""
    return Cnn(_config(config_name, options))


def save(model: Cnn, path: str | os.PathLike) -> Path:
    """Write the CNN's configuration and weights to ``path`` (atomically), for :func:`from_checkpoint`."""
    from kit.files import atomic_path

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"backbone": "cnn", "config": dataclasses.asdict(model.config), "state": state}, tmp)
    return Path(path)


def filter_state(raw: object) -> tuple[CnnConfig, dict]:
    """A read :func:`save` file or ``kit.train`` ``model.pt`` of a cnn run -> (config, state dict)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("state"), dict):
        raise CheckpointError("not a cnn checkpoint (expected a dict with 'config' and 'state')")
    config = raw.get("config")
    if raw.get("backbone") == "cnn" and isinstance(config, dict):  # written by save()
        try:
            fields = dict(
                config,
                channels=tuple(config["channels"]),
                spectrum_channels=tuple(config["spectrum_channels"]),
            )
            return CnnConfig(**fields), raw["state"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"unusable cnn config: {err}") from err
    if isinstance(config, dict) and "backbone" in config:  # kit.train's model.pt
        if config["backbone"] != "cnn":
            raise CheckpointError(
                f"a kit.train model of backbone {config['backbone']!r}, not cnn "
                f"(load it with kit.models.load_embedder)"
            )
        try:
            cnn_config = _config(
                config.get("backbone_config") or DEFAULT_CONFIG, config.get("backbone_options") or {}
            )
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"unusable cnn settings in the kit.train config: {err}") from err
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in raw["state"].items() if k.startswith(prefix)}
        return cnn_config, state
    raise CheckpointError("neither a cnn.save() file nor a kit.train model.pt")


def from_checkpoint(path: str | os.PathLike) -> Cnn:
    """Load a CNN written by :func:`save`, or the backbone of a ``kit.train`` ``model.pt`` (file or its
    run folder), with a strict key and shape check."""
    return loading.load_checkpoint(
        path, "cnn", filter_state, Cnn, hint=" (a frozen or partial kit.train run saves only what it trained)"
    )
