"""A training-free backbone: the log-mel spectrogram itself, one token per frame.

``LogMel(waves [B, S], lengths [B]) -> (frames [B, T, n_mels] in dB, padding_mask [B, T])``. Nothing
is learnt: with the parameter-free ``"stats"`` head (:class:`kit.heads.StatsPool`, mean and standard
deviation of every band over the valid frames) it gives the classic per-clip log-mel statistics
detector, run through the same embedding path (``kit.embed.extract``) and scoring backends as the
trained branches. ``kit.models.statistics_embedder`` builds that embedder.

Front-end, per clip at 16 kHz: power STFT (periodic Hann window, ``center=False``), an HTK mel
filterbank without area normalisation (torchaudio's ``MelSpectrogram`` defaults), ``10 log10(x +
1e-10)``. The ``"dcase"`` configuration (64 bands, n_fft 1024, hop 512) is the detector of
``kit.tools.synth_check`` except for ``center=False``: every frame lies inside its own clip, so a clip's
frames are the same alone or zero-padded in a batch (``center=True`` would reflect-pad each clip's
ends, which a padded batch cannot reproduce). With ``deltas`` each token also holds the frame-to-frame
difference of the bands, whose standard deviation measures how fast each band fluctuates.

The settings are also stored as a buffer: ``kit.embed`` keys its cache on the state dict, which must
therefore tell two configurations apart even where their filterbanks agree (e.g. another hop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torchaudio
from torch import nn

from kit.backbones import Backbone
from kit.features import POWER_FLOOR, SAMPLE_RATE, check_waves, masked_log_mel  # noqa: F401 (re-exported names)


@dataclass(frozen=True)
class LogMelConfig:
    """Log-mel front-end settings (sample rate 16 kHz)."""

    n_mels: int = 64
    n_fft: int = 1024
    hop_length: int = 512
    f_min: float = 0.0
    f_max: float = SAMPLE_RATE / 2
    deltas: bool = False

    def __post_init__(self) -> None:
        if self.n_fft < 2 or self.hop_length < 1 or self.n_mels < 1:
            raise ValueError(
                f"n_fft >= 2, hop_length >= 1 and n_mels >= 1 are needed, got {self.n_fft}, "
                f"{self.hop_length}, {self.n_mels}"
            )
        if not 0 <= self.f_min < self.f_max <= SAMPLE_RATE / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= {SAMPLE_RATE / 2}, got {self.f_min}, {self.f_max}")


CONFIGS = {
    "dcase": LogMelConfig(),  # the kit.tools.synth_check detector
    "dcase_deltas": LogMelConfig(deltas=True),
    "fine": LogMelConfig(n_mels=128, n_fft=2048, hop_length=512),
}
DEFAULT_CONFIG = "dcase"


class LogMel(Backbone):
    """Log-mel frames as tokens (no trainable weights); see the module docstring."""

    name = "logmel"
    trains_from_scratch = True  # nothing to load: no "no pretrained weights" warning
    has_grid = True  # grid_tokens: [frames, mel bands, 1] (2 with deltas)

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.n_mels * (2 if config.deltas else 1)
        self.blocks = nn.ModuleList()  # nothing to fine-tune
        self.lora_target_modules = ""
        self.min_samples = config.n_fft + (config.hop_length if config.deltas else 0)
        self.register_buffer("window", torch.hann_window(config.n_fft))
        filters = torchaudio.functional.melscale_fbanks(
            config.n_fft // 2 + 1, config.f_min, config.f_max, config.n_mels, SAMPLE_RATE
        )
        self.register_buffer("mel_filters", filters)
        settings = [config.n_mels, config.n_fft, config.hop_length, config.f_min, config.f_max, config.deltas]
        self.register_buffer("settings", torch.tensor([float(v) for v in settings], dtype=torch.float64))

    def frontend(self, waves: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel ``[B, T, n_mels]`` (dB) and each clip's frame count; frames past it are 0."""
        waves, lengths = check_waves(waves, lengths, self.config.n_fft, "LogMel")
        return masked_log_mel(
            waves, lengths, self.window, self.mel_filters, self.config.n_fft, self.config.hop_length
        )

    def forward(
        self, waves: torch.Tensor, lengths=None, augment=None, reference=None, reference_lengths=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``augment(logmel, frames)`` is applied to the log-mel in training mode (before the deltas)."""
        self._no_reference(reference)
        check_waves(waves, lengths, self.min_samples, "LogMel")
        logmel, frames = self.frontend(waves, lengths)
        logmel = self._augmented(logmel, frames, augment)
        if self.config.deltas:
            # Token t holds frame t and frame t+1 minus frame t: one token fewer than frames.
            delta = logmel[:, 1:] - logmel[:, :-1]
            logmel, frames = torch.cat([logmel[:, :-1], delta], dim=-1), frames - 1
        padding = torch.arange(logmel.shape[1], device=logmel.device) >= frames[:, None]
        return logmel.masked_fill(padding[:, :, None], 0.0), padding

    def grid_tokens(
        self, waves: torch.Tensor, lengths=None, reference=None, reference_lengths=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s frames with every mel band its own frequency cell: ``(tokens [B, T, n_mels,
        D], padding_mask [B, T])``, D = 1 (the band's level in dB) or, with ``deltas``, D = 2 (the level
        and its difference to the next frame). Per-band pooling then gives each band's (RDP-weighted)
        mean level, and its mean change with deltas. A scalar per cell is the frame itself: nothing
        finer exists here. Note for per-band scoring: the cosine between two 1-D cells is their sign
        alone, so cosine-based per-band distances (BEAM) say nothing on this grid; flatten the
        ``[n_mels, D]`` result (KNN, Mahalanobis) or use a Euclidean distance per band."""
        tokens, padding_mask = self(waves, lengths, reference=reference, reference_lengths=reference_lengths)
        batch, frames, _ = tokens.shape
        # forward concatenates [levels; deltas] per frame: split them into the last axis
        depth = 2 if self.config.deltas else 1
        grid = tokens.reshape(batch, frames, depth, self.config.n_mels).transpose(2, 3)
        return grid, padding_mask


def build(config_name: str = DEFAULT_CONFIG, **options) -> LogMel:
    """The named log-mel configuration; ``options`` override :class:`LogMelConfig` fields."""
    if config_name not in CONFIGS:
        raise ValueError(
            f"unknown logmel config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}"
        )
    fields = {f.name for f in dataclasses.fields(LogMelConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown logmel option(s) {unknown}: expected some of {sorted(fields)}")
    return LogMel(dataclasses.replace(CONFIGS[config_name], **options))


def from_checkpoint(path, **options) -> LogMel:
    raise ValueError(
        f"the logmel backbone has no weights to load (got checkpoint {path!s}); "
        "use kit.backbones.load('logmel', config=...) without a checkpoint"
    )
