"""The training-free log-mel backbone and the statistics embedder: known answers, padding, the
embedding path (kit.embed) and its cache key, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from kit import backbones, data, embed, models
from kit.backbones import logmel

SR = 16000


def _reference_statistics(wave: torch.Tensor) -> torch.Tensor:
    """torchaudio's MelSpectrogram (center=False) in dB, then mean and population std per band."""
    melspec = torchaudio.transforms.MelSpectrogram(
        sample_rate=SR, n_fft=1024, hop_length=512, n_mels=64, power=2.0, center=False
    )
    db = 10 * torch.log10(melspec(wave) + 1e-10)
    return torch.cat([db.mean(dim=1), db.std(dim=1, unbiased=False)])


def _waves(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for row, n in zip(waves, lengths):
        t = torch.arange(n) / SR
        row[:n] = 0.2 * torch.sin(2 * np.pi * 700 * t) + 0.05 * torch.randn(n, generator=gen)
    return waves, torch.tensor(lengths)


def test_registered_without_warning_and_without_weights():
    assert "logmel" in backbones.BACKBONES
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = backbones.load("logmel")
    assert isinstance(model, logmel.LogMel) and model.embed_dim == 64
    assert not list(model.parameters()) and len(model.blocks) == 0
    with pytest.raises(ValueError, match="no weights to load"):
        backbones.load("logmel", __file__)
    with pytest.raises(ValueError, match="unknown logmel config"):
        backbones.load("logmel", config="coarse")


def test_statistics_embedder_matches_torchaudio_on_every_clip_of_a_padded_batch():
    embedder = models.statistics_embedder()
    lengths = [16000, 5000, 23456]
    waves, lens = _waves(lengths)
    waves[1, 5000:] = 3.0  # padding content must not matter
    with torch.no_grad():
        batch = embedder(waves, lens)
    assert batch.shape == (3, 128)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(batch[i], _reference_statistics(waves[i, :n]), atol=2e-3, rtol=1e-4)


def test_deltas_add_the_frame_differences():
    model = logmel.build("dcase_deltas")
    waves, lens = _waves([9000, 6000])
    tokens, padding = model(waves, lens)
    frames, n_frames = model.frontend(waves, lens)
    assert tokens.shape[-1] == 128 and (~padding).sum(1).tolist() == (n_frames - 1).tolist()
    torch.testing.assert_close(tokens[0, :3, 64:], frames[0, 1:4] - frames[0, :3])
    torch.testing.assert_close(tokens[0, :3, :64], frames[0, :3])


def test_bad_input_gives_clear_errors():
    model = logmel.build()
    with pytest.raises(ValueError, match=r"shape \[batch, samples\]"):
        model(torch.zeros(3, 2, 1000))
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(torch.full((1, 4000), float("inf")))
    with pytest.raises(ValueError, match=r"clips \[0\] of the batch are shorter than 1024 samples"):
        model(torch.zeros(1, 1000))
    with pytest.raises(ValueError, match="f_min < f_max"):
        logmel.build(f_max=20000.0)


def test_extract_runs_on_it_and_the_cache_tells_configurations_apart(tmp_path):
    folder = tmp_path / "root" / "dev_data" / "raw" / "toy" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, seconds in enumerate((1.0, 0.7, 1.3)):
        sf.write(
            folder / f"section_00_source_train_normal_{i:04d}_a_1.wav",
            0.1 * rng.standard_normal(int(seconds * SR)),
            SR,
        )
    index = data.build_index(tmp_path / "root", progress=False)
    embedder = models.statistics_embedder()
    meta, emb, cache = embed.extract(
        embedder, index, tmp_path / "run", "stats", channels=("near",), progress=False
    )
    assert emb.shape == (3, 128) and list(meta["channel"]) == ["near"] * 3
    for row, path in zip(emb, meta["path"]):
        wave = torch.from_numpy(data.load_audio(path))
        np.testing.assert_allclose(row, _reference_statistics(wave).numpy(), atol=2e-3, rtol=1e-4)
    other = models.statistics_embedder(hop_length=256)  # same filterbank, another hop
    _, emb_other, cache_other = embed.extract(
        other, index, tmp_path / "run", "stats", channels=("near",), progress=False
    )
    assert cache_other != cache and not np.allclose(emb_other, emb)


@pytest.mark.parametrize("config", ["dcase", "dcase_deltas"])
def test_grid_tokens_give_every_mel_band_its_cell(config):
    model = backbones.load("logmel", config=config)
    assert model.has_grid
    waves, lengths = _waves([16000, 9000])
    tokens, padding = model(waves, lengths)
    grid, grid_padding = model.grid_tokens(waves, lengths)
    depth = 2 if model.config.deltas else 1
    assert grid.shape == (2, tokens.shape[1], 64, depth) and torch.equal(grid_padding, padding)
    levels, _ = model.frontend(waves, lengths)
    valid = ~padding
    torch.testing.assert_close(grid[..., 0][valid], levels[:, : tokens.shape[1]][valid])  # band f = mel f
    if depth == 2:
        delta = levels[:, 1:] - levels[:, :-1]
        torch.testing.assert_close(grid[..., 1][valid], delta[valid])
    # back to forward's [levels; deltas] tokens
    torch.testing.assert_close(grid.transpose(2, 3).reshape(tokens.shape), tokens)
    alone, _ = model.grid_tokens(waves[1:, :9000], lengths[1:])
    torch.testing.assert_close(grid[1, valid[1]], alone[0])
