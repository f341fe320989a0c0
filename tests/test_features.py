"""The batched Kaldi fbank equals torchaudio's per-clip fbank, clip by clip, in a padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as ta_kaldi

from kit.features import kaldi_fbank

BEATS = dict(num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10)
EAT = dict(
    htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning", num_mel_bins=128,
    dither=0.0, frame_shift=10,
)  # fmt: skip
ATOL = 1e-4


def _padded_batch(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in clips])
    waves = torch.zeros(len(clips), int(lengths.max()))
    for row, clip in zip(waves, clips):
        row[: len(clip)] = clip
    return waves, lengths


def _assert_matches_torchaudio(clips: list[torch.Tensor], options: dict) -> None:
    waves, lengths = _padded_batch(clips)
    features, n_frames = kaldi_fbank(waves, lengths, **options)
    assert features.shape[0] == len(clips) and features.shape[1] == int(n_frames.max())
    window = int(options.get("sample_frequency", 16000) * options.get("frame_length", 25.0) / 1000)
    for i, clip in enumerate(clips):
        if len(clip) < window:  # torchaudio refuses a clip shorter than one window
            assert int(n_frames[i]) == 0 and torch.all(features[i] == 0)
            continue
        reference = ta_kaldi.fbank(clip[None], **options)
        assert int(n_frames[i]) == reference.shape[0]
        torch.testing.assert_close(features[i, : n_frames[i]], reference, rtol=0, atol=ATOL)
        assert torch.all(features[i, n_frames[i] :] == 0)


def _random_clips(scale: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(n, generator=generator) * 2 - 1) * scale for n in (16000, 12345, 4321, 401)]


@pytest.mark.parametrize(
    "options, scale",
    [
        (BEATS, 2**15),
        (EAT, 1.0),
        (dict(BEATS, use_energy=True), 2**15),
        (dict(BEATS, use_energy=True, htk_compat=True, energy_floor=0.0), 1.0),
        (dict(BEATS, snip_edges=False), 2**15),
        (dict(BEATS, window_type="hamming", frame_length=30, round_to_power_of_two=False), 2**15),
        (dict(BEATS, window_type="blackman", preemphasis_coefficient=0.0, remove_dc_offset=False), 2**15),
        (dict(EAT, window_type="rectangular", use_log_fbank=False, use_power=False, low_freq=0), 1.0),
        (dict(BEATS, num_mel_bins=64, high_freq=-400, sample_frequency=8000), 2**15),
    ],
    ids=["beats", "eat", "energy", "energy-htk", "no-snip", "hamming", "blackman", "linear", "8k"],
)
def test_random_batch_matches_torchaudio_per_clip(options, scale):
    _assert_matches_torchaudio(_random_clips(scale), options)


def test_real_audio_matches_torchaudio_per_clip(mimii_sample):
    files = [
        "pump/normal/pump_normal.wav",
        "valve/abnormal/valve_abnormal.wav",
        "fan_id00/normal/00000003.wav",
    ]
    clips = []
    for name, seconds in zip(files, (10.0, 6.5, 3.2)):
        wave, rate = sf.read(mimii_sample / name, dtype="float32")
        assert rate == 16000 and wave.ndim == 1
        clips.append(torch.from_numpy(wave[: int(seconds * rate)]))
    _assert_matches_torchaudio([c * 2**15 for c in clips], BEATS)  # BEATs' scaling
    _assert_matches_torchaudio([c - c.mean() for c in clips], EAT)  # EAT's mean removal


def test_clips_shorter_than_a_window_have_no_frames():
    waves, lengths = _padded_batch([torch.ones(1000), torch.ones(399), torch.ones(0)])
    features, n_frames = kaldi_fbank(waves, lengths)
    assert n_frames.tolist() == [4, 0, 0]  # 1 + (1000 - 400) // 160
    assert torch.all(features[1:] == 0)
    empty, counts = kaldi_fbank(torch.randn(2, 300))
    assert empty.shape == (2, 0, 128) and counts.tolist() == [0, 0]


def test_default_lengths_and_float64():
    waves = torch.randn(2, 8000, dtype=torch.float64) * 1000
    features, n_frames = kaldi_fbank(waves)
    assert features.dtype == torch.float64 and n_frames.tolist() == [48, 48]
    same, _ = kaldi_fbank(waves, torch.tensor([8000, 8000]))
    assert torch.equal(features, same)
    reference = ta_kaldi.fbank(waves[1:], num_mel_bins=128)
    torch.testing.assert_close(features[1], reference, rtol=0, atol=ATOL)


def test_autocast_does_not_lower_the_precision():
    waves = torch.randn(2, 8000) * 2**14
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, _ = kaldi_fbank(waves)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, kaldi_fbank(waves)[0], rtol=0, atol=0)


def test_padding_content_is_ignored():
    clip = torch.randn(5000) * 1000
    padded = torch.cat([clip, torch.full((3000,), float("nan"))])[None]
    features, n_frames = kaldi_fbank(padded, torch.tensor([5000]))
    alone, _ = kaldi_fbank(clip[None])
    assert torch.equal(features[0, : n_frames[0]], alone[0])
    assert torch.all(features[0, n_frames[0] :] == 0)


@pytest.mark.parametrize(
    "waves, lengths, options, message",
    [
        (torch.randn(16000), None, {}, "2-D tensor"),
        (torch.randn(2, 2, 16000), None, {}, "2-D tensor"),
        (torch.zeros(2, 16000, dtype=torch.long), None, {}, "floating point"),
        (np.zeros((2, 16000)), None, {}, "torch.Tensor"),
        (torch.randn(2, 16000), torch.tensor([16000]), {}, r"shape \[2\]"),
        (torch.randn(2, 16000), torch.tensor([16000, 16001]), {}, r"\[0, 16000\]"),
        (torch.randn(2, 16000), torch.tensor([-1, 100]), {}, r"\[0, 16000\]"),
        (torch.randn(2, 16000), torch.tensor([1.0, 2.0]), {}, "integer"),
        (torch.tensor([[0.0] * 800 + [float("nan")] + [0.0] * 799] * 2), None, {}, r"NaN.*\[0, 1\]"),
        (torch.randn(1, 16000), None, {"window_type": "kaiser"}, "window_type"),
        (torch.randn(1, 16000), None, {"low_freq": 9000.0}, "low_freq"),
        (torch.randn(1, 16000), None, {"num_mel_bins": 3}, "num_mel_bins"),
        (torch.randn(1, 16000), None, {"preemphasis_coefficient": 1.5}, "preemphasis"),
        (torch.randn(1, 16000), None, {"frame_length": 25.0625, "round_to_power_of_two": False}, "even"),
    ],
)
def test_bad_input_raises(waves, lengths, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kaldi_fbank(waves, lengths, **options)
