"""Training-time augmentations: SpecAugment, mixup, and noise-aware mixing with far-channel audio.

All take an explicit ``torch.Generator`` so a training step is reproducible from ``(seed, step)``
alone; that is what lets an interrupted run resume onto exactly the same trajectory.

Feature layout: every backbone's front-end puts time on dim -2 and frequency on dim -1
(BEATs ``[B, T, 128]``, EAT ``[B, 1, T, 128]``, FISHER ``[B, T, F]``, cnn and logmel ``[B, T, mels]``),
so one SpecAugment serves all. Training hands it to the backbone's forward call as
``augment=lambda features, n_frames: spec(features, n_frames, generator)``; the backbone applies it
between its front-end and its encoder, in training mode only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SpecAugment:
    """Zero ``time_masks`` bands of up to ``time_width`` frames and ``freq_masks`` bands of up to
    ``freq_width`` bins, independently per example, inside each example's valid frames."""

    time_masks: int = 2
    time_width: int = 40
    freq_masks: int = 2
    freq_width: int = 16

    def __call__(
        self, feats: torch.Tensor, n_frames: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        batch, n_time, n_freq = feats.shape[0], feats.shape[-2], feats.shape[-1]
        device = feats.device
        n_frames = n_frames.to(device).clamp(min=1)
        keep = torch.ones(batch, n_time, n_freq, dtype=torch.bool, device=device)
        time_idx = torch.arange(n_time, device=device)
        freq_idx = torch.arange(n_freq, device=device)

        def draw(count: int, width: int, extent: torch.Tensor):
            if count <= 0 or width <= 0:
                return None
            widths = (torch.rand(batch, count, generator=generator) * (width + 1)).long().to(device)
            widths = torch.minimum(widths, extent[:, None])
            starts = (
                torch.rand(batch, count, generator=generator).to(device) * (extent[:, None] - widths + 1)
            ).long()
            return starts, widths

        spans = draw(self.time_masks, self.time_width, n_frames)
        if spans is not None:
            starts, widths = spans
            hit = (time_idx[None, None] >= starts[..., None]) & (
                time_idx[None, None] < (starts + widths)[..., None]
            )
            keep &= ~hit.any(1)[:, :, None]
        spans = draw(self.freq_masks, self.freq_width, torch.full((batch,), n_freq, device=device))
        if spans is not None:
            starts, widths = spans
            hit = (freq_idx[None, None] >= starts[..., None]) & (
                freq_idx[None, None] < (starts + widths)[..., None]
            )
            keep &= ~hit.any(1)[:, None, :]
        shape = (batch,) + (1,) * (feats.dim() - 3) + (n_time, n_freq)
        return feats * keep.view(shape).to(feats.dtype)


def mixup(
    waves: torch.Tensor, lengths: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mix each clip with a partner (a permutation of the batch) with one Beta(alpha, alpha) weight.

    Returns the mixed waves, their lengths (the longer of the two), the partner permutation and the
    weight ``lam`` of the original clip; the loss is ``lam * L(y) + (1 - lam) * L(y[perm])``.
    """
    lam = 1.0
    if alpha > 0:
        # numpy's Beta sampler, seeded from the step generator, keeps resumed runs exact
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(waves.shape[0], generator=generator).to(waves.device)
    mixed = lam * waves + (1 - lam) * waves[perm]
    return mixed, torch.maximum(lengths, lengths[perm]), perm, lam


def noise_mix(
    waves: torch.Tensor,
    lengths: torch.Tensor,
    noise: torch.Tensor,
    noise_lengths: torch.Tensor,
    prob: float,
    snr_db: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Add far-channel audio of *other* clips as environmental noise at a random SNR.

    The far microphone records little machine sound and much room noise, so it is a free, realistic
    noise source. ``noise[i]`` is added to ``waves[i]`` (callers pass the far channels of a shifted
    batch) with probability ``prob``, scaled so that machine-to-noise power is ``snr_db``; the noise
    is tiled over the clip's valid samples when shorter.
    """
    batch, n = waves.shape
    device = waves.device
    apply = (torch.rand(batch, generator=generator) < prob).to(device)
    snr = (snr_db[0] + torch.rand(batch, generator=generator) * (snr_db[1] - snr_db[0])).to(device)
    t = torch.arange(n, device=device)
    src = t[None] % noise_lengths.clamp(min=1).to(device)[:, None]
    tiled = torch.gather(noise, 1, src.clamp(max=noise.shape[1] - 1))
    valid = (t[None] < lengths.to(device)[:, None]).to(waves.dtype)
    tiled = tiled * valid
    p_sig = (waves**2).sum(1) / lengths.clamp(min=1).to(device)
    p_noise = (tiled**2).sum(1) / lengths.clamp(min=1).to(device)
    gain = torch.sqrt(p_sig / (p_noise.clamp(min=1e-12) * 10 ** (snr / 10)))
    gain = torch.where(apply & (p_noise > 0), gain, torch.zeros_like(gain))
    return waves + gain[:, None] * tiled
