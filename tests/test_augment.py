"""Augmentations: SpecAugment stays inside valid frames, noise mixing hits its SNR, mixup is seeded."""

import torch

from kit.augment import SpecAugment, mixup, noise_mix


def test_spec_augment_masks_bands_and_is_reproducible():
    feats = torch.ones(3, 1, 100, 64)
    n_frames = torch.tensor([100, 60, 30])
    aug = SpecAugment(time_masks=2, time_width=10, freq_masks=2, freq_width=8)
    out = aug(feats, n_frames, torch.Generator().manual_seed(1))
    again = aug(feats, n_frames, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert out.shape == feats.shape and (out == 0).any()
    zero_rows = (out[:, 0] == 0).all(-1)  # time frames masked entirely
    for i, n in enumerate(n_frames.tolist()):
        assert not zero_rows[i, n:].any()  # never beyond a clip's own frames
        assert zero_rows[i].sum() <= 2 * 10
    zero_cols = (out[:, 0] == 0).all(-2)
    assert (zero_cols.sum(-1) <= 2 * 8).all()


def test_noise_mix_reaches_the_requested_snr():
    gen = torch.Generator().manual_seed(0)
    waves = torch.sin(torch.linspace(0, 200, 8000)).repeat(4, 1)
    lengths = torch.full((4,), 8000)
    noise = torch.randn(4, 3000, generator=gen)  # shorter than the clip: tiled
    mixed = noise_mix(waves, lengths, noise, torch.full((4,), 3000), 1.0, (10.0, 10.0), gen)
    added = mixed - waves
    snr = 10 * torch.log10(waves.pow(2).mean(1) / added.pow(2).mean(1))
    torch.testing.assert_close(snr, torch.full((4,), 10.0), atol=0.05, rtol=0)
    untouched = noise_mix(waves, lengths, noise, torch.full((4,), 3000), 0.0, (10.0, 10.0), gen)
    assert torch.equal(untouched, waves)


def test_mixup_is_a_convex_mix_from_the_generator():
    waves = torch.randn(6, 100)
    lengths = torch.tensor([100, 90, 80, 70, 60, 50])
    a = mixup(waves, lengths, 0.4, torch.Generator().manual_seed(3))
    b = mixup(waves, lengths, 0.4, torch.Generator().manual_seed(3))
    mixed, mixed_lengths, perm, lam = a
    assert torch.equal(mixed, b[0]) and lam == b[3]
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(mixed, lam * waves + (1 - lam) * waves[perm])
    assert torch.equal(mixed_lengths, torch.maximum(lengths, lengths[perm]))
