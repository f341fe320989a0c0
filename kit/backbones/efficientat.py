"""EfficientAT MobileNetV3 (Schmid, Koutini, Widmer, ICASSP 2023): AudioSet-pretrained CNNs, 1-68 M weights.

The released models (``mn04_as`` ... ``mn40_as``, MIT licence, ``RELEASES``) are MobileNetV3-Large
networks distilled from PaSST transformers on AudioSet, at channel widths 0.4 to 4.0. Layout, with the
release state dict's names (``features.N`` as in the authors' code, so a release file loads as it is):

- front-end (the authors' ``AugmentMelSTFT`` in eval mode): 16 kHz input resampled to 32 kHz with
  ``torchaudio.functional.resample``'s defaults, pre-emphasis ``x[t + 1] - 0.97 x[t]``, STFT (``n_fft``
  1024, Hann window of 800 samples, ``periodic=False``, hop 320 = 10 ms, ``center=True``: reflect
  padding), power, 128 Kaldi mel banks from 0 to 15 kHz, ``(log(mel + 1e-5) + 4.5) / 5``; the
  training-time fmin/fmax jitter and masking of the authors are not used (``forward``'s ``augment``,
  e.g. SpecAugment, takes their place);
- ``features.0``: 3x3 stride-2 conv, BatchNorm, Hardswish; ``features.1`` ... ``features.15``: the
  fifteen inverted-residual blocks of MobileNetV3-Large (``BLOCKS``; channels times the width, rounded
  to multiples of 8; squeeze-excitation over channels in ten of them; stride 2 in four), ``blocks``
  here; ``features.16``: 1x1 conv to ``6 x`` the last block's channels (384 for mn04), BatchNorm,
  Hardswish. Time and frequency are divided by 32 in all: 128 mel bins become 4 bands, 10-ms frames
  320-ms time steps;
- ``classifier`` (the ``mlp`` head): pooling, Linear, Hardswish, Dropout, Linear to the 527 AudioSet
  classes; used by :meth:`EfficientAT.audioset_logits` only.

Tokens: one per time step of the last feature map, averaged over its frequency bands (``[B, T', C]``,
C = ``embed_dim``), so their mean over an unpadded clip is the authors' pooled embedding;
``grid_tokens`` keeps the bands (``[B, T', 4, C]``).

Padding is exact. A clip's frames are computed from its own samples (the zero padding of the batch is
zeroed before resampling, and each clip's STFT padding reflects its own end, as ``center=True`` does
for a clip alone); then the input of every convolution wider than 1x1 is zeroed beyond each clip's
own time steps (what a clip alone sees as the convolution's zero padding) and squeeze-excitation
averages each clip's own time steps only. So a clip's valid tokens are the same alone as in a padded
batch, to float rounding (measured on the fixture clips, 3.3 s padded to 10 s: 3e-6; tested). Without
these masks the same clip's tokens move by up to 6 (mostly squeeze-excitation averaging the padding),
its mean token by 1.5. A time step is valid when its stride-32 position starts
inside the clip's mel frames: ``ceil(frames / 32)`` of them (each stride-2 layer keeps ``ceil(n / 2)``
steps, as it does on the clip alone).

BatchNorm stays in eval mode during fine-tuning (:meth:`EfficientAT.train` keeps every BatchNorm
layer in eval mode: running statistics frozen, affine weights still trained): batches of 8-32 clips
of one machine would otherwise replace the AudioSet statistics, and batch statistics would mix the
clips of a batch (and their padding). The random-initialisation configurations (``CONFIGS``, one per
width) are therefore for tests and speed benchmarks, not for training from scratch. LoRA does not
apply (``lora_target_modules`` is empty: LoRA adapts attention projections, which a CNN lacks); use
``full`` or ``partial`` fine-tuning.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kit.backbones import Backbone, CheckpointError, loading
from kit.features import check_waves

SAMPLE_RATE = 16000  # the toolkit's input rate
MODEL_RATE = 32000  # the rate the released models were trained at
N_MELS = 128
N_FFT = 1024
WIN_LENGTH = 800
HOP = 320
F_MIN, F_MAX = 0.0, 15000.0  # the authors' eval-mode band: fmax = sr / 2 - 1000
PREEMPHASIS = 0.97
LOG_OFFSET = 1e-5
NORM_SHIFT, NORM_SCALE = 4.5, 5.0  # the authors' "fast normalisation" (x + 4.5) / 5
BN_EPS, BN_MOMENTUM = 0.001, 0.01
STRIDE = 32  # time and frequency downsampling of the feature extractor
# The shortest clip: center=True reflect-pads 512 samples, which needs more than 512 pre-emphasised
# samples at 32 kHz (2 * 257 - 1 = 513).
MIN_SAMPLES = 257

# MobileNetV3-Large (Howard et al. 2019, Table 1), before width scaling:
# (in, kernel, expanded, out, squeeze-excitation, activation, stride)
BLOCKS = (
    (16, 3, 16, 16, False, "relu", 1),
    (16, 3, 64, 24, False, "relu", 2),
    (24, 3, 72, 24, False, "relu", 1),
    (24, 5, 72, 40, True, "relu", 2),
    (40, 5, 120, 40, True, "relu", 1),
    (40, 5, 120, 40, True, "relu", 1),
    (40, 3, 240, 80, False, "hardswish", 2),
    (80, 3, 200, 80, False, "hardswish", 1),
    (80, 3, 184, 80, False, "hardswish", 1),
    (80, 3, 184, 80, False, "hardswish", 1),
    (80, 3, 480, 112, True, "hardswish", 1),
    (112, 3, 672, 112, True, "hardswish", 1),
    (112, 5, 672, 160, True, "hardswish", 2),
    (160, 5, 960, 160, True, "hardswish", 1),
    (160, 5, 960, 160, True, "hardswish", 1),
)
STEM_CHANNELS = 16
HEAD_HIDDEN = 1280  # the mlp head's hidden width before scaling
SE_REDUCTION = 4
_ACTIVATIONS = {"relu": nn.ReLU, "hardswish": nn.Hardswish}


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: the nearest multiple of ``divisor`` (at least ``divisor``), never
    more than 10 % below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class EfficientATConfig:
    """A MobileNetV3 width (``width`` scales every channel count) and its AudioSet head."""

    width: float = 0.4
    num_classes: int = 527
    dropout: float = 0.2  # of the mlp head (audioset_logits in training mode only)

    def __post_init__(self) -> None:
        if not self.width > 0 or self.num_classes < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"need width > 0, num_classes >= 1 and 0 <= dropout < 1, got {self.width}, "
                f"{self.num_classes}, {self.dropout}"
            )

    def channels(self, count: int) -> int:
        return make_divisible(count * self.width)

    @property
    def embed_dim(self) -> int:
        """Channels of the last feature map: six times the last block's output."""
        return 6 * self.channels(BLOCKS[-1][3])


CONFIGS: dict[str, EfficientATConfig] = {
    f"mn{round(width * 10):02d}": EfficientATConfig(width=width) for width in (0.4, 0.5, 1.0, 2.0, 3.0, 4.0)
}
DEFAULT_CONFIG = "mn04"

RELEASE_URL = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"
# The AudioSet releases (v0.0.1 of github.com/fschmid56/EfficientAT, MIT licence): file name, size in
# bytes where verified here (mn04, the fixture; None for the others, whose downloads are checked by
# the server's Content-Length and the strict load), width, configuration here, parameters (features +
# mlp head, counted on the model built from the configuration; a test keeps them in step), AudioSet mAP.
RELEASES: dict[str, dict] = {
    "mn04_as": {"file": "mn04_as_mAP_432.pt", "bytes": 4_066_513, "width": 0.4, "config": "mn04",
                "parameters": 983_599, "mAP": 0.432},
    "mn05_as": {"file": "mn05_as_mAP_443.pt", "bytes": None, "width": 0.5, "config": "mn05",
                "parameters": 1_431_239, "mAP": 0.443},
    "mn10_as": {"file": "mn10_as_mAP_471.pt", "bytes": None, "width": 1.0, "config": "mn10",
                "parameters": 4_876_831, "mAP": 0.471},
    "mn20_as": {"file": "mn20_as_mAP_478.pt", "bytes": None, "width": 2.0, "config": "mn20",
                "parameters": 17_909_287, "mAP": 0.478},
    "mn30_as": {"file": "mn30_as_mAP_482.pt", "bytes": None, "width": 3.0, "config": "mn30",
                "parameters": 39_086_367, "mAP": 0.482},
    "mn40_as": {"file": "mn40_as_mAP_484.pt", "bytes": None, "width": 4.0, "config": "mn40",
                "parameters": 68_427_303, "mAP": 0.484},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Layers


def _masked(x: Tensor, valid: Tensor | None) -> Tensor:
    """``x [B, C, F, T]`` with the time steps outside ``valid [B, T]`` set to 0 (None: all valid)."""
    return x if valid is None else x * valid[:, None, None, :].to(x.dtype)


def _halved(valid: Tensor | None) -> Tensor | None:
    """The valid steps after a stride-2 convolution (odd kernel, ``(k - 1) // 2`` padding): the map
    keeps ``ceil(T / 2)`` steps and a clip of ``n`` steps its first ``ceil(n / 2)``, as alone."""
    if valid is None:
        return None
    counts = (valid.sum(dim=1) + 1) // 2
    return torch.arange((valid.shape[1] + 1) // 2, device=valid.device) < counts[:, None]


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> optional activation, with torchvision's ``0``/``1`` names."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: str | None = None,
    ) -> None:
        layers = [
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if activation is not None:
            layers.append(_ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.spatial, self.stride = kernel > 1, stride

    def masked(self, x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The layer on ``x`` whose padded time steps are zeroed first (a wider-than-1x1 conv reads its
        neighbours); returns the output and its valid steps."""
        if not self.spatial:
            return self(x), valid
        out = self(_masked(x, valid))
        return out, _halved(valid) if self.stride == 2 else valid


class SqueezeExcitation(nn.Module):
    """Channel attention: the mean of each channel over frequency and each clip's valid time steps ->
    Linear -> ReLU -> Linear -> sigmoid, scaling the channels."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, squeezed)
        self.fc2 = nn.Linear(squeezed, channels)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        if valid is None:
            mean = x.mean(dim=(2, 3))
        else:
            steps = valid.sum(dim=1, keepdim=True).to(x.dtype) * x.shape[2]
            mean = _masked(x, valid).sum(dim=(2, 3)) / steps
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(mean))))
        return x * scale[:, :, None, None]


class InvertedResidual(nn.Module):
    """Expand (1x1, when wider) -> depthwise k x k (stride 1 or 2) -> squeeze-excitation -> project
    (1x1, no activation), plus the input where shapes allow (stride 1, same channels)."""

    def __init__(self, spec: tuple, config: EfficientATConfig) -> None:
        super().__init__()
        c_in, kernel, expanded, c_out, use_se, activation, stride = spec
        c_in, expanded, c_out = (config.channels(c) for c in (c_in, expanded, c_out))
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(ConvNormActivation(c_in, expanded, 1, activation=activation))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, expanded, activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // SE_REDUCTION)))
        layers.append(ConvNormActivation(expanded, c_out, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        out, out_valid = x, valid
        for layer in self.block:
            if isinstance(layer, SqueezeExcitation):
                out = layer(out, out_valid)
            else:
                out, out_valid = layer.masked(out, out_valid)
        return (out + x if self.residual else out), out_valid


# ----------------------------------------------------------------------------------------------
# The backbone


class EfficientAT(Backbone):
    """EfficientAT's MobileNetV3 behind the :class:`kit.backbones.Backbone` interface."""

    name = "efficientat"
    lora_target_modules = ""  # a CNN: no attention projections for LoRA to adapt
    has_grid = True
    min_samples = MIN_SAMPLES

    def __init__(self, config: EfficientATConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        stem = config.channels(STEM_CHANNELS)
        last = config.channels(BLOCKS[-1][3])
        self.features = nn.Sequential(
            ConvNormActivation(1, stem, 3, 2, activation="hardswish"),
            *(InvertedResidual(spec, config) for spec in BLOCKS),
            ConvNormActivation(last, self.embed_dim, 1, activation="hardswish"),
        )
        hidden = config.channels(HEAD_HIDDEN)
        self.classifier = nn.Sequential(  # the authors' indices: classifier.2 and classifier.5 hold weights
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(self.embed_dim, hidden),
            nn.Hardswish(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, config.num_classes),
        )
        # Front-end constants: buffers that follow .to(device) but stay out of the state dict.
        self.register_buffer("window", torch.hann_window(WIN_LENGTH, periodic=False), persistent=False)
        self.register_buffer("preemphasis", torch.tensor([[[-PREEMPHASIS, 1.0]]]), persistent=False)
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            N_MELS, N_FFT, float(MODEL_RATE), F_MIN, F_MAX, 100.0, -500.0, 1.0
        )
        self.register_buffer("mel_banks", F.pad(banks, (0, 1)), persistent=False)  # [128, 513]
        self._init_weights()
        self.train()  # BatchNorm to eval mode (nn.Module's default would leave it training)

    @property
    def blocks(self) -> nn.Sequential:
        """The fifteen inverted-residual blocks (``features.1`` ... ``features.15``), for partial
        fine-tuning; the stem and the final 1x1 conv stay with the first and last blocks' fate."""
        return self.features[1:-1]

    def _init_weights(self) -> None:
        """The authors' initialisation (random-init configurations only; a checkpoint replaces it)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def train(self, mode: bool = True) -> EfficientAT:
        """Training mode for everything but BatchNorm, whose running statistics stay the pretrained
        ones (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    # ------------------------------------------------------------------ front-end

    def frontend(self, waves: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised log-mel ``[B, T, 128]`` (32 kHz, 10-ms frames) of ``waves [B, S]`` at 16 kHz, and
        each clip's frame count ``1 + (2 * length - 1) // 320``; frames beyond it are 0."""
        waves, lengths = check_waves(waves, lengths, self.min_samples, self.name)
        samples = torch.arange(waves.shape[1], device=waves.device)
        waves = waves * (samples < lengths[:, None])  # what lies beyond a clip is silence, as alone
        with torch.autocast(waves.device.type, enabled=False):
            x = torchaudio.functional.resample(waves, SAMPLE_RATE, MODEL_RATE)
            x = F.conv1d(x[:, None], self.preemphasis).squeeze(1)  # one sample shorter
            own = 2 * lengths - 1  # each clip's pre-emphasised samples
            x = _reflect_pad_each(x, own, N_FFT // 2)
            spec = torch.stft(x, N_FFT, HOP, WIN_LENGTH, self.window, center=False, return_complex=True)
            power = torch.view_as_real(spec).square().sum(-1)  # [B, 513, T]
            mel = torch.matmul(self.mel_banks, power)
            mel = ((mel + LOG_OFFSET).log() + NORM_SHIFT) / NORM_SCALE
        n_frames = 1 + torch.div(own, HOP, rounding_mode="floor")
        mel = mel.transpose(1, 2)
        valid = torch.arange(mel.shape[1], device=mel.device) < n_frames[:, None]
        return mel.masked_fill(~valid[..., None], 0.0), n_frames

    # ------------------------------------------------------------------ encoder

    def feature_map(
        self, waves: Tensor, lengths: Tensor | None = None, augment=None
    ) -> tuple[Tensor, Tensor]:
        """The last feature map ``[B, C, 4, T']`` (frequency, then time, as the authors' ``features``)
        and its valid time steps ``[B, T']``; padded steps hold 0."""
        mel, n_frames = self.frontend(waves, lengths)
        mel = self._augmented(mel, n_frames, augment)
        steps = torch.arange(mel.shape[1], device=mel.device)
        valid = steps < n_frames[:, None]
        mask = None if bool(valid.all()) else valid  # equal lengths: no masking work
        x = mel.transpose(1, 2)[:, None]  # [B, 1, 128, T]
        x, mask = self.features[0].masked(x, mask)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # BatchNorm is in eval mode: the recomputation gives the same values
                x, mask = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x, mask = block(x, mask)
        x = self.features[-1](x)
        n_steps = n_frames
        for _ in range(int(math.log2(STRIDE))):
            n_steps = torch.div(n_steps + 1, 2, rounding_mode="floor")
        valid = torch.arange(x.shape[-1], device=x.device) < n_steps[:, None]
        return _masked(x, valid), valid

    def forward(
        self,
        waves: Tensor,
        lengths: Tensor | None = None,
        augment=None,
        reference=None,
        reference_lengths=None,
    ) -> tuple[Tensor, Tensor]:
        """``(tokens [B, T', C], padding_mask [B, T'])``: one token per 320-ms time step, the last
        feature map averaged over its frequency bands; padded tokens are 0. ``augment(mel, n_frames)``
        acts on the log-mel ``[B, T, 128]`` in training mode."""
        self._no_reference(reference)
        fmap, valid = self.feature_map(waves, lengths, augment)
        return fmap.mean(dim=2).transpose(1, 2), ~valid

    def grid_tokens(
        self, waves: Tensor, lengths: Tensor | None = None, reference=None, reference_lengths=None
    ) -> tuple[Tensor, Tensor]:
        """``(tokens [B, T', 4, C], padding_mask [B, T'])``: the last feature map per frequency band."""
        self._no_reference(reference)
        fmap, valid = self.feature_map(waves, lengths)
        return fmap.permute(0, 3, 2, 1), ~valid

    def embedding(self, waves: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``[B, C]``: the mean of each clip's valid tokens (the authors' pooled "features")."""
        tokens, padding = self(waves, lengths)
        valid = (~padding)[..., None].to(tokens.dtype)
        return (tokens * valid).sum(dim=1) / valid.sum(dim=1)

    def audioset_logits(self, waves: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``[B, num_classes]``: the AudioSet logits of the release's mlp head (a sigmoid gives the
        probabilities), pooling each clip's own time steps only."""
        return self.classifier[2:](self.embedding(waves, lengths))


def _reflect_pad_each(x: Tensor, own: Tensor, pad: int) -> Tensor:
    """``[B, S + 2 pad]``: each row padded as ``F.pad(row[:own], (pad, pad), mode="reflect")`` would
    pad it alone (its end reflects its own last samples, not the batch's padding), then laid out to the
    batch's length; positions past a clip's own padded length hold clamped copies (padding frames)."""
    positions = torch.arange(x.shape[1] + 2 * pad, device=x.device) - pad
    index = positions.abs()[None].expand(x.shape[0], -1)
    last = (own - 1)[:, None]
    index = torch.where(index > last, 2 * last - index, index).clamp(0, x.shape[1] - 1)
    return torch.gather(x, 1, index)


# ----------------------------------------------------------------------------------------------
# Factory and checkpoints


def build(config_name: str = DEFAULT_CONFIG, **options) -> EfficientAT:
    """A randomly initialised model of a named width; ``options`` override EfficientATConfig fields."""
    if config_name not in CONFIGS:
        raise ValueError(
            f"unknown efficientat config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}"
        )
    known = {f.name for f in fields(EfficientATConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown efficientat option(s) {unknown}: expected some of {sorted(known)}")
    return EfficientAT(replace(CONFIGS[config_name], **options))


def release_checkpoint(spec):
    """``load``'s hook: a release name (``mn04_as`` ... ``mn40_as``) becomes its download URL;
    anything else that exists or looks like a path, URL or repo id is returned unchanged. A bare word
    that is none of these is refused with the known release names."""
    if not isinstance(spec, str) or Path(spec).expanduser().exists():
        return spec
    if spec in RELEASES:
        return RELEASE_URL + RELEASES[spec]["file"]
    if re.fullmatch(r"[\w.-]+", spec) and not spec.lower().endswith(loading.TORCH_SUFFIXES):
        raise CheckpointError(
            f"unknown EfficientAT release {spec!r}: known releases are {', '.join(RELEASES)} "
            "(or pass a local .pt file or a URL)"
        )
    return spec


_LAST_CONV = "features.16.0.weight"
_SE_LAYER = re.compile(r"(.*)\.conc_se_layers\.(\d+)\.(fc[12]\.(?:weight|bias))")


def filter_state(raw: object) -> tuple[EfficientATConfig, dict]:
    """A read release file (a plain state dict of ``features.*`` and ``classifier.*`` tensors) ->
    (config, state dict). The width comes from the last conv's channels (six times the last block's),
    the class count from the head; the authors' concurrent squeeze-excitation wrapper
    (``block.N.conc_se_layers.0.fc1``) becomes this model's ``block.N.fc1``."""
    if not isinstance(raw, dict) or _LAST_CONV not in raw or "classifier.5.bias" not in raw:
        found = sorted(map(str, raw))[:8] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(
            "not an EfficientAT MobileNet release: expected the plain state dict of a file such as "
            f"mn04_as_mAP_432.pt (keys features.0 ... features.16, classifier.2, classifier.5), found {found}"
        )
    channels = raw[_LAST_CONV].shape[0]
    by_channels = {config.embed_dim: name for name, config in CONFIGS.items()}
    if channels not in by_channels:
        expected = ", ".join(f"{c} ({n})" for c, n in sorted(by_channels.items()))
        raise CheckpointError(
            f"{_LAST_CONV} has {channels} output channels, which matches no known width: expected one of "
            f"{expected} (only the mlp-head models of widths 0.4-4.0 are supported)"
        )
    config = replace(CONFIGS[by_channels[channels]], num_classes=int(raw["classifier.5.bias"].shape[0]))
    state = {}
    for key, value in raw.items():
        match = _SE_LAYER.fullmatch(str(key))
        if match and match.group(2) != "0":
            raise CheckpointError(
                f"{key}: concurrent squeeze-excitation over several dimensions is not supported "
                "(the released models squeeze over channels only)"
            )
        state[f"{match.group(1)}.{match.group(3)}" if match else key] = value
    return config, state


def from_checkpoint(path: str | os.PathLike, **options) -> EfficientAT:
    """Load a released EfficientAT state dict (``mn04_as_mAP_432.pt`` ...; any of the widths) with a
    strict key and shape check."""
    if options:
        raise ValueError(f"efficientat takes no loading options, got {sorted(options)}")
    return loading.load_checkpoint(path, "EfficientAT", filter_state, EfficientAT)
