"""Far-channel noise cancellers: the far microphone as a noise reference before the backbone.

A 2026 clip holds two channels of one recording: ``N`` (channel 0, the near microphone: machine plus
noise) and ``F`` (channel 1, the far microphone: much noise, less machine). A canceller turns the pair
into one mono waveform ``Y`` with less noise than ``N``, which then goes to any backbone as a channel of
its own. Every method works on the STFT (Hann window, ``n_fft`` 1024, ``hop`` 512 at 16 kHz, zero
padding at the edges), changes the near spectrum and returns the inverse STFT, cut to exactly the input
length. Sums over ``t`` run over a clip's valid frames only (the frames that touch its ``lengths``
samples), so a clip in a zero-padded batch gives what it gives alone. ``eps`` is relative: it is
multiplied by the mean over bins of the denominator, so a silent far channel gives ``H = 0``.

Methods (the name is the channel name; settings in brackets with their defaults):

- ``w1`` whole-clip least-squares gain [eps 1e-6]: one complex gain per frequency bin, fitted on the
  whole clip, ``H[f] = sum_t N[f,t] conj(F[f,t]) / (sum_t |F[f,t]|^2 + eps)``, ``Y = N - H F``. The
  public 2026 canceller (frozen BEATs 61.3 -> 67.5 dev hmean).
- ``ss`` magnitude spectral subtraction [beta 1.0, gamma 0.1]: ``|Y| = max(|N| - beta |F|, gamma |N|)``
  with the phase of ``N`` (``Y = N max(1 - beta |F| / |N|, gamma)``). No fitting; the other published
  variant.
- ``w3`` multi-tap least squares [taps 3, ridge 1e-3]: per bin a short filter across neighbouring frames,
  ``Y[f,t] = N[f,t] - sum_k h_k[f] F[f,t-o_k]`` with offsets ``o_k = -(taps//2) .. taps//2``, ``h`` the
  ridge-regularised least-squares solution ``(R + ridge tr(R)/taps I)^-1 r`` with
  ``R = sum_t x_t^* x_t^T``, ``r = sum_t x_t^* N[f,t]``, ``x_t = (F[f,t-o_k])_k``. Follows noise paths
  whose delay or reverberation reaches beyond what one gain per bin (a delay well under a frame) models.
- ``wv`` time-varying least-squares gain [window 63 frames (2 s), eps 1e-6]: the ``w1`` sums taken over a
  sliding Hann window of frames, ``H[f,t] = sum_s w(t-s) N conj(F) / (sum_s w(t-s) |F|^2 + eps)``; follows
  noise that moves or changes level during the clip.
- ``wl`` leakage-aware, level-weighted least-squares gain [ridge 0.05, eps 1e-6]: ``w1`` fitted on the
  noise-dominated cells only, ``H[f] = sum_t w N conj(F) / (sum_t w |F|^2 + ridge sum_t |F|^2 + eps)``
  with ``w[f,t] = max(0, 1 - |N[f,t]|^2 / |F[f,t]|^2)``, ``Y = N - H F``. When the far microphone also
  hears the machine, near and far are coherent through the machine, and the plain whole-clip fit is
  pulled towards the machine's near/far transfer: it cancels machine sound and can lower the near SNR.
  The machine is louder at the near microphone and the environment at the far one, so ``w`` (the share
  of a far cell's power in excess of the near cell's) is near 1 on noise-dominated cells and 0 on
  machine-dominated ones; the ridge (a fraction of the bin's whole far power) backs the gain off
  towards 0 in bins with few noise-dominated cells, where near and far are coherent through the machine
  (the machine's tones). Its prior (noise louder at the far microphone) costs depth where the noise is
  equally loud at both.

All methods also take ``n_fft`` and ``hop`` (``hop`` at most ``n_fft / 2``). API (the registry
``CANCELLERS`` holds each method's function, default settings and summary):

``cancel(pair, method, lengths=None, **settings)``: ``pair`` a float tensor ``[B, 2, T]`` or ``[2, T]``
(channel 0 near, 1 far) or a ``(near, far)`` tuple of ``[B, T]`` / ``[T]``; ``lengths [B]`` valid samples
(None: all). Returns float32 ``[B, T]`` (or ``[T]``) on the input's device, zero beyond each length;
pure torch (``torch.stft`` / ``torch.istft``), so it runs on CPU and GPU and is differentiable.
``cancel_numpy(pair [2, T], method, **settings) -> [T]`` for data loaders; ``settings_key(method,
settings)`` a stable text (method and every setting, sorted) for cache keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

N_FFT = 1024
HOP = 512
TINY = 1e-20  # keeps ratios finite where a clip is digitally silent


@dataclasses.dataclass(frozen=True)
class Canceller:
    """One canceller: its channel name, its function on near/far spectra, its default settings."""

    name: str
    function: Callable[..., Tensor]
    defaults: Mapping[str, float | int]
    summary: str


# ---------------------------------------------------------------- the methods (on spectra)
# Each takes near, far: complex [B, bins, frames]; valid: real [B, 1, frames] (1 on valid frames) and
# its settings; it returns the cleaned near spectrum, same shape.


def _relative_eps(denominator: Tensor, eps: float, dims: tuple[int, ...]) -> Tensor:
    return eps * denominator.mean(dim=dims, keepdim=True) + TINY


def _magnitude(spectrum: Tensor) -> Tensor:
    """|spectrum| with a finite gradient at 0 (torch.abs has none there)."""
    return torch.sqrt(spectrum.real.square() + spectrum.imag.square() + TINY)


def _whole_clip_statistics(near: Tensor, far: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per bin over the valid frames: sum N conj(F), sum |F|^2, sum |N|^2 (each [B, bins, 1])."""
    cross = (valid * near * far.conj()).sum(dim=-1, keepdim=True)
    far_power = (valid * (far.real.square() + far.imag.square())).sum(dim=-1, keepdim=True)
    near_power = (valid * (near.real.square() + near.imag.square())).sum(dim=-1, keepdim=True)
    return cross, far_power, near_power


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")


def whole_clip_gain(near: Tensor, far: Tensor, valid: Tensor, *, eps: float) -> Tensor:
    """``w1``: ``Y = N - H F`` with one least-squares gain per bin over the clip."""
    _check_eps(eps)
    cross, far_power, _ = _whole_clip_statistics(near, far, valid)
    gain = cross / (far_power + _relative_eps(far_power, eps, (1,)))
    return near - gain * far


def spectral_subtraction(near: Tensor, far: Tensor, valid: Tensor, *, beta: float, gamma: float) -> Tensor:
    """``ss``: ``|Y| = max(|N| - beta |F|, gamma |N|)`` with the near phase."""
    if not beta >= 0:
        raise ValueError(f"beta must be non-negative, got {beta!r}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma (the floor, a fraction of |N|) must be in [0, 1], got {gamma!r}")
    gain = torch.clamp(1.0 - beta * _magnitude(far) / _magnitude(near), min=gamma)
    return near * gain


def _shifted(spectrum: Tensor, offset: int) -> Tensor:
    """``spectrum[..., t - offset]`` with zeros where that frame does not exist."""
    if offset == 0:
        return spectrum
    frames = spectrum.shape[-1]
    if abs(offset) >= frames:
        return torch.zeros_like(spectrum)
    if offset > 0:
        return F.pad(spectrum[..., : frames - offset], (offset, 0))
    return F.pad(spectrum[..., -offset:], (0, -offset))


def multi_tap_gain(near: Tensor, far: Tensor, valid: Tensor, *, taps: int, ridge: float) -> Tensor:
    """``w3``: per bin a least-squares filter over ``taps`` neighbouring far frames."""
    if taps < 1 or taps % 2 == 0:
        raise ValueError(f"taps must be a positive odd number (centred on the frame), got {taps!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be non-negative, got {ridge!r}")
    offsets = range(-(taps // 2), taps // 2 + 1)
    # zero-padding keeps F = 0 beyond each clip's frames, so the shifted frames equal the clip's own
    taps_far = torch.stack([_shifted(far, o) for o in offsets], dim=-1)  # [B, bins, frames, taps]
    weighted = taps_far.conj() * valid[..., None]
    covariance = torch.einsum("bftk,bftj->bfkj", weighted, taps_far)
    target = torch.einsum("bftk,bft->bfk", weighted, near)
    trace = torch.diagonal(covariance, dim1=-2, dim2=-1).real.sum(-1)  # [B, bins]
    loading = ridge * trace / taps + _relative_eps(trace, 1e-6, (1,))
    identity = torch.eye(taps, dtype=covariance.dtype, device=covariance.device)
    filters = torch.linalg.solve(covariance + loading[..., None, None] * identity, target[..., None])
    return near - torch.einsum("bftk,bfk->bft", taps_far, filters[..., 0])


def time_varying_gain(near: Tensor, far: Tensor, valid: Tensor, *, window: int, eps: float) -> Tensor:
    """``wv``: the least-squares gain over a sliding Hann window of ``window`` frames."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of frames, got {window!r}")
    _check_eps(eps)
    batch, bins, frames = near.shape
    cross = valid * near * far.conj()
    far_power = valid * (far.real.square() + far.imag.square())
    statistics = torch.stack([cross.real, cross.imag, far_power], dim=2).reshape(-1, 1, frames)
    kernel = torch.hann_window(window + 2, periodic=False, dtype=near.real.dtype, device=near.device)[1:-1]
    smoothed = F.conv1d(statistics, kernel.view(1, 1, -1), padding=window // 2)
    smoothed = smoothed.reshape(batch, bins, 3, frames)
    local_cross = torch.complex(smoothed[:, :, 0], smoothed[:, :, 1])
    local_power = smoothed[:, :, 2]
    frame_count = valid.sum(dim=-1, keepdim=True).clamp(min=1)  # the mean over valid frames and bins
    scale = (local_power * valid).sum(dim=(1, 2), keepdim=True) / (bins * frame_count)
    gain = local_cross / (local_power + eps * scale + TINY)
    return near - gain * far


def level_weighted_gain(near: Tensor, far: Tensor, valid: Tensor, *, ridge: float, eps: float) -> Tensor:
    """``wl``: the least-squares gain fitted on the far power in excess of the near power."""
    if not ridge >= 0:
        raise ValueError(f"ridge must be non-negative, got {ridge!r}")
    _check_eps(eps)
    near_power = near.real.square() + near.imag.square()
    far_power = far.real.square() + far.imag.square()
    noise_share = torch.clamp(1.0 - near_power / (far_power + TINY), min=0.0)
    weight = valid * noise_share
    cross = (weight * near * far.conj()).sum(dim=-1, keepdim=True)
    weighted_power = (weight * far_power).sum(dim=-1, keepdim=True)
    far_total = (valid * far_power).sum(dim=-1, keepdim=True)
    # the ridge, in units of the bin's whole far power, pulls bins with few noise cells towards H = 0
    denominator = weighted_power + ridge * far_total
    gain = cross / (denominator + _relative_eps(far_total, eps, (1,)))
    return near - gain * far


_STFT_DEFAULTS = {"n_fft": N_FFT, "hop": HOP}

CANCELLERS: dict[str, Canceller] = {
    c.name: c
    for c in (
        Canceller("w1", whole_clip_gain, {"eps": 1e-6}, "whole-clip complex least-squares gain per bin"),
        Canceller("ss", spectral_subtraction, {"beta": 1.0, "gamma": 0.1}, "magnitude spectral subtraction"),
        Canceller("w3", multi_tap_gain, {"taps": 3, "ridge": 1e-3}, "least-squares filter over 3 frames"),
        Canceller("wv", time_varying_gain, {"window": 63, "eps": 1e-6}, "sliding-window (2 s) gain"),
        Canceller("wl", level_weighted_gain, {"ridge": 0.05, "eps": 1e-6}, "gain fitted where far is louder"),
    )
}
for _canceller in CANCELLERS.values():
    object.__setattr__(_canceller, "defaults", MappingProxyType({**_STFT_DEFAULTS, **_canceller.defaults}))


# ---------------------------------------------------------------- settings


def _method(method: str) -> Canceller:
    if method not in CANCELLERS:
        raise ValueError(f"unknown canceller {method!r}; known: {', '.join(CANCELLERS)}")
    return CANCELLERS[method]


def resolve_settings(method: str, settings: Mapping[str, object] | None = None) -> dict[str, float | int]:
    """Every setting of ``method``: its defaults updated by ``settings``, with the defaults' types."""
    canceller = _method(method)
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(canceller.defaults))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for canceller {method!r}; known: {sorted(canceller.defaults)}"
        )
    resolved = dict(canceller.defaults)
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"setting {key}={value!r} of canceller {method!r} must be a number")
        if isinstance(canceller.defaults[key], int):
            if float(value) != int(value):
                raise ValueError(f"setting {key}={value!r} of canceller {method!r} must be a whole number")
            resolved[key] = int(value)
        else:
            resolved[key] = float(value)
    n_fft, hop = resolved["n_fft"], resolved["hop"]
    if n_fft < 2 or n_fft % 2 or not 0 < hop <= n_fft // 2:
        raise ValueError(
            f"n_fft must be even and hop in [1, n_fft / 2] (Hann overlap-add), got n_fft={n_fft}, hop={hop}"
        )
    return resolved


def settings_key(method: str, settings: Mapping[str, object] | None = None) -> str:
    """A stable text naming ``method`` and all its settings (defaults filled in, sorted by name), e.g.
    ``w1(eps=1e-06,hop=512,n_fft=1024)``: part of a cache key, so a changed setting gives a new key."""
    resolved = resolve_settings(method, settings)
    return f"{method}(" + ",".join(f"{key}={resolved[key]!r}" for key in sorted(resolved)) + ")"


# ---------------------------------------------------------------- input checks and the STFT frame


def _mono_error(shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"a canceller needs the stereo near/far pair (channel 0 near, channel 1 far), got a mono clip of "
        f"shape {list(shape)}; pass [B, 2, T], [2, T] or (near, far)"
    )


def _as_tensor(x: object, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{what} must hold real audio samples, got dtype {x.dtype}")
    return x


def _as_pair_batch(pair: object) -> tuple[Tensor, bool]:
    """``pair`` as float32 ``[B, 2, T]`` and whether the input was one clip."""
    if isinstance(pair, (tuple, list)):
        if len(pair) != 2:
            raise ValueError(f"a (near, far) pair must have 2 elements, got {len(pair)}")
        near, far = (_as_tensor(x, name) for x, name in zip(pair, ("near", "far")))
        if near.shape != far.shape:
            raise ValueError(
                f"near {list(near.shape)} and far {list(far.shape)} differ in shape: the pair must be the "
                "two time-aligned channels of one recording, of equal length"
            )
        if near.ndim not in (1, 2):
            raise ValueError(f"near and far must be [T] or [B, T], got {list(near.shape)}")
        pair = torch.stack([near, far], dim=-2)
    x = _as_tensor(pair, "pair")
    shape = tuple(x.shape)
    if x.ndim == 1 or (x.ndim in (2, 3) and x.shape[-2] == 1):
        raise _mono_error(shape)
    if x.ndim == 2 and x.shape[0] != 2:
        hint = " (frames x channels, as soundfile reads; pass its transpose)" if x.shape[1] == 2 else ""
        raise ValueError(f"expected a stereo clip [2, T], got shape {list(shape)}{hint}")
    if x.ndim == 3 and x.shape[1] != 2:
        raise ValueError(f"expected a stereo batch [B, 2, T], got shape {list(shape)}")
    if x.ndim > 3:
        raise ValueError(f"expected [B, 2, T] or [2, T], got shape {list(shape)}")
    if x.shape[-1] == 0 or (x.ndim == 3 and x.shape[0] == 0):
        raise ValueError(f"empty input of shape {list(shape)}")
    single = x.ndim == 2
    x = x[None] if single else x
    finite = torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
    if not bool(finite.all()):
        clip = int((~finite).nonzero()[0])
        raise ValueError(f"clip {clip} of the input holds NaN or infinite samples")
    return x.to(torch.float32), single


def _as_lengths(lengths: object, batch: int, samples: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((batch,), samples, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths).reshape(-1)
    if lengths.is_floating_point() and not bool((lengths == lengths.round()).all()):
        raise ValueError(f"lengths must be whole numbers of samples, got {lengths.tolist()}")
    lengths = lengths.to(dtype=torch.long, device=device)
    if lengths.numel() != batch:
        raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {batch} clips")
    if bool(((lengths < 1) | (lengths > samples)).any()):
        raise ValueError(f"lengths must be in [1, {samples}] (the padded length), got {lengths.tolist()}")
    return lengths


def cancel(pair: object, method: str, lengths: object = None, **settings: float) -> Tensor:
    """The cleaned near channel of a stereo batch (see the module docstring for shapes and methods)."""
    canceller = _method(method)
    resolved = resolve_settings(method, settings)
    n_fft, hop = resolved.pop("n_fft"), resolved.pop("hop")
    x, single = _as_pair_batch(pair)
    batch, _, samples = x.shape
    lengths = _as_lengths(lengths, batch, samples, x.device)
    inside = torch.arange(samples, device=x.device)[None, :] < lengths[:, None]  # [B, T]
    x = x * inside[:, None, :]
    # n_fft zeros on the right: every frame that touches a valid sample exists whatever the padding
    padded = F.pad(x, (0, n_fft)).reshape(batch * 2, -1)
    window = torch.hann_window(n_fft, dtype=x.dtype, device=x.device)
    spectra = torch.stft(
        padded, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True
    )
    spectra = spectra.reshape(batch, 2, *spectra.shape[-2:])
    frames = spectra.shape[-1]
    valid_frames = (lengths + n_fft // 2 - 1) // hop + 1  # frames whose window reaches a valid sample
    valid = (torch.arange(frames, device=x.device)[None, :] < valid_frames[:, None]).to(x.dtype)
    cleaned = canceller.function(spectra[:, 0], spectra[:, 1], valid[:, None, :], **resolved)
    y = torch.istft(cleaned, n_fft, hop, window=window, center=True, length=samples + n_fft)
    y = y[:, :samples] * inside
    return y[0] if single else y


def cancel_numpy(pair: np.ndarray | Sequence[np.ndarray], method: str, **settings: float) -> np.ndarray:
    """:func:`cancel` for one clip as numpy: ``pair [2, T]`` (or ``(near, far)``) -> float32 ``[T]``."""
    if isinstance(pair, np.ndarray) and pair.ndim == 3:
        raise ValueError(f"cancel_numpy takes one clip [2, T], got a batch of shape {list(pair.shape)}")
    if isinstance(pair, (tuple, list)):
        pair = tuple(np.ascontiguousarray(channel) for channel in pair)
    elif isinstance(pair, np.ndarray):
        pair = np.ascontiguousarray(pair)
    with torch.no_grad():
        return cancel(pair, method, **settings).cpu().numpy()
