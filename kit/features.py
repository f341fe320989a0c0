"""Features: the spectrogram front-ends the backbones share (each backbone's own, such as FISHER's
log-spectrum or EfficientAT's mel, stays in its file; the far-channel cancellers are kit.denoise).

- :func:`kaldi_fbank`: the batched Kaldi-compatible log-mel filterbank of BEATs and EAT;
- :func:`masked_log_mel`: the log-mel (dB) of the logmel and cnn backbones, with :func:`check_waves`,
  :func:`frame_counts` and :func:`power_frames`.

Batched Kaldi-compatible log-mel filterbank:

BEATs and EAT were trained on ``torchaudio.compliance.kaldi.fbank`` features, and that function takes
one clip at a time (a Python loop over the batch, one small FFT per clip). :func:`kaldi_fbank` computes
the same features for a whole zero-padded batch at once: frames are cut with ``unfold`` (or one
gather when ``snip_edges`` is False), one ``rfft`` covers every frame of every clip and one matrix
product applies the mel filterbank from ``torchaudio.compliance.kaldi.get_mel_banks``.

Each clip is framed only within its own length, so clip ``i`` of the batch gives exactly what
``kaldi.fbank(waves[i, :lengths[i]][None], ...)`` gives (to float rounding); rows beyond its own frame
count are 0. A clip shorter than one window has 0 frames (torchaudio refuses such a clip).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchaudio.compliance.kaldi import get_mel_banks

SAMPLE_RATE = 16000
POWER_FLOOR = 1e-10  # added to the mel power before the log
WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")
BLACKMAN_COEFF = 0.42  # torchaudio's default; the only value this front-end offers


def kaldi_fbank(
    waves: Tensor,
    lengths: Tensor | None = None,
    *,
    num_mel_bins: int = 128,
    sample_frequency: float = 16000.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    dither: float = 0.0,
    window_type: str = "povey",
    htk_compat: bool = False,
    use_energy: bool = False,
    remove_dc_offset: bool = True,
    preemphasis_coefficient: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    use_log_fbank: bool = True,
    use_power: bool = True,
    energy_floor: float = 1.0,
    round_to_power_of_two: bool = True,
    snip_edges: bool = True,
) -> tuple[Tensor, Tensor]:
    """Kaldi filterbank features of a batch of mono clips.

    ``waves`` [B, T] (float, zero-padded), ``lengths`` [B] valid samples per clip (None: all T).
    Options mean what they mean in ``torchaudio.compliance.kaldi.fbank`` (its other options keep their
    defaults: raw energy, no VTLN, no mean subtraction). Returns ``(features [B, F, num_mel_bins]
    (+1 column with use_energy: last with htk_compat, else first), n_frames [B])``, F the largest frame
    count; rows of a clip beyond its own ``n_frames`` are 0. Computed in float32 (float64 inputs stay
    float64).
    """
    waves, lengths = _check_batch(waves, lengths)
    window_size = int(sample_frequency * frame_length * 0.001)
    window_shift = int(sample_frequency * frame_shift * 0.001)
    padded_size = 2 ** (window_size - 1).bit_length() if round_to_power_of_two else window_size
    _check_options(
        window_type, window_size, window_shift, padded_size, preemphasis_coefficient, sample_frequency,
        num_mel_bins, low_freq, high_freq,
    )  # fmt: skip

    n_frames = _frame_counts(lengths, window_size, window_shift, snip_edges)
    n_out = num_mel_bins + int(use_energy)
    batch, max_frames = waves.shape[0], int(n_frames.max()) if waves.shape[0] else 0
    if max_frames == 0:
        return waves.new_zeros(batch, 0, n_out), n_frames

    frames = _cut_frames(waves, lengths, max_frames, window_size, window_shift, snip_edges)
    if dither != 0.0:
        frames = frames + torch.randn_like(frames) * dither
    if remove_dc_offset:
        frames = frames - frames.mean(dim=-1, keepdim=True)
    epsilon = torch.tensor(torch.finfo(torch.float32).eps, device=waves.device, dtype=waves.dtype)
    if use_energy:  # Kaldi's raw energy: after DC removal, before pre-emphasis and windowing
        log_energy = torch.maximum(frames.pow(2).sum(-1), epsilon).log()
        if energy_floor != 0.0:
            log_energy = log_energy.clamp_min(math.log(energy_floor))
    if preemphasis_coefficient != 0.0:
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[j-1], x[0] repeated at j=0
        frames = frames - preemphasis_coefficient * previous
    frames = frames * _window(window_type, window_size, waves.device, waves.dtype)

    spectrum = torch.fft.rfft(frames, n=padded_size)
    # |X|^2 as re^2 + im^2: the same value as abs().pow(2) without a square root per bin
    spectrum = torch.view_as_real(spectrum).pow(2).sum(-1) if use_power else spectrum.abs()
    filters = _mel_matrix(num_mel_bins, padded_size, sample_frequency, low_freq, high_freq)
    with torch.autocast(waves.device.type, enabled=False):  # power spectra overflow float16
        mel = spectrum @ filters.to(device=waves.device, dtype=waves.dtype)
    if use_log_fbank:
        mel = torch.maximum(mel, epsilon).log()
    if use_energy:
        parts = (mel, log_energy[..., None]) if htk_compat else (log_energy[..., None], mel)
        mel = torch.cat(parts, dim=-1)

    valid = torch.arange(max_frames, device=waves.device) < n_frames[:, None]
    # checked on the (much smaller) output: a NaN or inf sample makes every frame holding it non-finite
    bad = ((~torch.isfinite(mel)).any(-1) & valid).any(-1)
    if bool(bad.any()):
        raise ValueError(f"waves hold NaN or infinite samples in clips {bad.nonzero().flatten().tolist()}")
    return torch.where(valid[..., None], mel, mel.new_zeros(())), n_frames


def _check_batch(waves: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    if not isinstance(waves, Tensor):
        raise TypeError(f"waves must be a torch.Tensor [batch, samples], got {type(waves).__name__}")
    if waves.dim() != 2:
        raise ValueError(
            f"waves must be a 2-D tensor [batch, samples] of mono clips, got shape {tuple(waves.shape)}"
        )
    if not waves.is_floating_point():
        raise ValueError(f"waves must be floating point, got {waves.dtype}")
    if waves.dtype not in (torch.float32, torch.float64):
        waves = waves.float()  # half precision has no CPU rfft and loses the log-mel accuracy
    batch, samples = waves.shape
    if lengths is None:
        lengths = torch.full((batch,), samples, dtype=torch.long, device=waves.device)
    else:
        lengths = torch.as_tensor(lengths, device=waves.device)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}] (one per clip), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be integer sample counts, got {lengths.dtype}")
        lengths = lengths.long()
        if batch and (int(lengths.min()) < 0 or int(lengths.max()) > samples):
            raise ValueError(
                f"lengths must lie in [0, {samples}] (the padded length), got {lengths.tolist()}"
            )
    return waves, lengths


def _check_options(
    window_type,
    window_size,
    window_shift,
    padded_size,
    preemphasis,
    sample_frequency,
    num_mel_bins,
    low,
    high,
) -> None:
    if window_type not in WINDOW_TYPES:
        raise ValueError(f"unknown window_type {window_type!r}: expected one of {', '.join(WINDOW_TYPES)}")
    if sample_frequency <= 0:
        raise ValueError(f"sample_frequency must be > 0, got {sample_frequency}")
    if window_size < 2 or window_shift < 1:
        raise ValueError(
            f"frame_length/frame_shift give a window of {window_size} and a shift of {window_shift} samples: "
            "expected a window of at least 2 samples and a shift of at least 1"
        )
    if padded_size % 2:
        raise ValueError(
            f"the FFT size {padded_size} must be even: use round_to_power_of_two or change frame_length"
        )
    if not 0.0 <= preemphasis <= 1.0:
        raise ValueError(f"preemphasis_coefficient must lie in [0, 1], got {preemphasis}")
    if num_mel_bins <= 3:
        raise ValueError(f"num_mel_bins must be > 3, got {num_mel_bins}")
    nyquist = 0.5 * sample_frequency
    top = high + nyquist if high <= 0.0 else high
    if not (0.0 <= low < nyquist and 0.0 < top <= nyquist and low < top):
        raise ValueError(
            f"low_freq {low} and high_freq {high} (effective {top}) must satisfy "
            f"0 <= low_freq < high_freq <= nyquist {nyquist} (high_freq <= 0 counts back from nyquist)"
        )


def _frame_counts(lengths: Tensor, window_size: int, window_shift: int, snip_edges: bool) -> Tensor:
    if snip_edges:
        counts = 1 + torch.div(lengths - window_size, window_shift, rounding_mode="floor")
    else:
        counts = torch.div(lengths + window_shift // 2, window_shift, rounding_mode="floor")
    return torch.where(lengths >= window_size, counts, torch.zeros_like(counts))


def _cut_frames(
    waves: Tensor, lengths: Tensor, max_frames: int, window_size: int, window_shift: int, snip_edges: bool
) -> Tensor:
    """Frames [B, max_frames, window_size]; only the first n_frames of each clip are meaningful."""
    if snip_edges:
        # a clip's own frames never reach past its length, so framing the padded batch is exact for them
        return waves.unfold(1, window_size, window_shift)[:, :max_frames]
    # Frames centred on multiples of the shift; samples outside [0, L) are mirrored at the clip's own
    # edges with the edge sample repeated (Kaldi: ... x1 x0 | x0 x1 ... x[L-1] | x[L-1] x[L-2] ...)
    pad = window_size // 2 - window_shift // 2
    starts = torch.arange(max_frames, device=waves.device) * window_shift - pad
    index = (starts[:, None] + torch.arange(window_size, device=waves.device))[None]  # [1, F, W]
    length = lengths[:, None, None]
    index = torch.where(index < 0, -index - 1, index)
    index = torch.where(index >= length, 2 * length - 1 - index, index)
    index = index.clamp(0, waves.shape[1] - 1)  # only frames beyond a clip's own count can stray
    return torch.gather(waves, 1, index.reshape(waves.shape[0], -1)).view(-1, max_frames, window_size)


def _window(window_type: str, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if window_type == "hanning":
        return torch.hann_window(size, periodic=False, device=device, dtype=dtype)
    if window_type == "povey":  # like Hann but reaching zero at both ends
        return torch.hann_window(size, periodic=False, device=device, dtype=dtype).pow(0.85)
    if window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, device=device, dtype=dtype)
    if window_type == "rectangular":
        return torch.ones(size, device=device, dtype=dtype)
    # Kaldi's Blackman window (torch.blackman_window uses other coefficients)
    step = 2 * math.pi / (size - 1)
    position = torch.arange(size, device=device, dtype=dtype)
    return (
        BLACKMAN_COEFF
        - 0.5 * torch.cos(step * position)
        + (0.5 - BLACKMAN_COEFF) * torch.cos(2 * step * position)
    )


@functools.lru_cache(maxsize=16)
def _mel_matrix(num_mel_bins: int, fft_size: int, sample_frequency: float, low: float, high: float) -> Tensor:
    """[fft_size // 2 + 1, num_mel_bins] triangular filters (the Nyquist bin gets weight 0, as in Kaldi)."""
    banks, _ = get_mel_banks(num_mel_bins, fft_size, sample_frequency, low, high, 100.0, -500.0, 1.0)
    return F.pad(banks, (0, 1)).T.contiguous()


# --------------------------------------------------------------------------------------------------
# The log-mel (dB) of the logmel and cnn backbones
# --------------------------------------------------------------------------------------------------
def check_waves(waves, lengths, min_samples: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch ``waves [B, S]`` / ``lengths [B]`` (None: every clip is S samples long).

    Raises ValueError naming the problem: not a 2-D float tensor, NaN/inf samples, lengths of the
    wrong shape or beyond S, a clip shorter than ``min_samples``."""
    if not torch.is_tensor(waves) or waves.dim() != 2 or not waves.is_floating_point():
        shape = tuple(waves.shape) if torch.is_tensor(waves) else type(waves).__name__
        raise ValueError(f"{who} expects float waves of shape [batch, samples] at 16 kHz, got {shape}")
    if not bool(torch.isfinite(waves).all()):
        bad = (~torch.isfinite(waves)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{who}: input waves hold NaN or infinite samples (clips {bad} of the batch)")
    batch, samples = waves.shape
    if lengths is None:
        lengths = torch.full((batch,), samples, dtype=torch.long, device=waves.device)
    lengths = torch.as_tensor(lengths, device=waves.device).long()
    if lengths.shape != (batch,):
        raise ValueError(f"{who}: lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    if bool((lengths > samples).any()):
        raise ValueError(f"{who}: lengths {lengths.tolist()} exceed the {samples} samples of the waves")
    if bool((lengths < min_samples).any()):
        short = (lengths < min_samples).nonzero().flatten().tolist()
        raise ValueError(
            f"{who}: clips {short} of the batch are shorter than {min_samples} samples "
            f"({min_samples / SAMPLE_RATE:.3f} s), the shortest input this configuration accepts "
            f"(lengths {lengths.tolist()})"
        )
    return waves.float(), lengths


def frame_counts(lengths: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """STFT frames that lie entirely inside a clip of ``lengths`` samples (``center=False``)."""
    return torch.div(lengths - n_fft, hop_length, rounding_mode="floor") + 1


def power_frames(waves: torch.Tensor, window: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """Power STFT ``[B, T, n_fft // 2 + 1]`` of a batch, ``center=False`` (float32, no autocast)."""
    with torch.autocast(waves.device.type, enabled=False):
        spec = torch.stft(
            waves.float(),
            n_fft=n_fft,
            hop_length=hop_length,
            window=window.float(),
            center=False,
            return_complex=True,
        )
        return torch.view_as_real(spec).pow(2).sum(-1).transpose(1, 2)


def masked_log_mel(
    waves: torch.Tensor,
    lengths: torch.Tensor,
    window: torch.Tensor,
    mel_filters: torch.Tensor,
    n_fft: int,
    hop_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel ``[B, T, n_mels]`` (dB) of checked waves and each clip's frame count ``[B]``; frames past
    a clip's end are 0 (the front-end of the logmel and cnn backbones)."""
    power = power_frames(waves, window, n_fft, hop_length)
    logmel = 10.0 * torch.log10(power @ mel_filters.float() + POWER_FLOOR)
    frames = frame_counts(lengths, n_fft, hop_length)
    past_end = torch.arange(logmel.shape[1], device=logmel.device) >= frames[:, None]
    return logmel.masked_fill(past_end[:, :, None], 0.0), frames
