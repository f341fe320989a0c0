"""Per-band embeddings [N, F, D] through kit.embed (pooling "band_mean" / "band_rdp"): the backbone's
grid tokens pooled per band over time, windows averaged per band, the cache key, collapse on 3-D,
the error for a backbone without a grid, and notebook 07 recording both branches end to end."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from kit import backbones, data, embed, heads, manifest, models, pipeline
from kit.backbones import Backbone, cnn

SR = 16000


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six stereo clips (two machines, 0.5 to 0.75 s): tones plus noise."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    for machine, f0 in (("fan", 500.0), ("valve", 3000.0)):
        folder = root / "dev_data" / "raw" / machine / "train"
        folder.mkdir(parents=True)
        for i in range(3):
            t = np.arange(int((0.5 + 0.125 * i) * SR)) / SR
            near = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(len(t))
            far = 0.1 * near + 0.05 * rng.standard_normal(len(t))
            name = f"section_00_source_train_normal_{i:04d}_a_{i}.wav"
            sf.write(folder / name, np.stack([near, far], 1).astype(np.float32), SR, subtype="PCM_16")
    return data.build_index(root, progress=False)


def _cnn_embedder(seed: int = 0) -> models.Embedder:
    torch.manual_seed(seed)
    backbone = backbones.load("cnn", config="unit")
    return models.Embedder(backbone, heads.make_head("mean", backbone.embed_dim, 8)).eval()


def _expected(embedder, wave: np.ndarray, pooling: str, gamma: float = 4.0) -> np.ndarray:
    """The per-band embedding of one clip, by hand: grid tokens of the clip alone, pooled."""
    with torch.no_grad():
        tokens, mask = embedder.backbone.grid_tokens(torch.from_numpy(wave).float()[None])
        return heads.band_pool(pooling, tokens, mask, gamma)[0].numpy()


KW = dict(channels=("near",), num_workers=0, progress=False)


@pytest.mark.parametrize("pooling", heads.BAND_POOLINGS)
def test_per_band_embeddings_are_the_backbone_grid_pooled_per_band(clips, pooling):
    embedder = _cnn_embedder()
    items, emb = embed.compute_embeddings(embedder, clips, pooling=pooling, batch_size=4, **KW)
    cfg = embedder.backbone.config
    assert emb.shape == (len(clips), cfg.n_mels >> len(cfg.channels), cfg.channels[-1])  # [N, F', C]
    for row, clip in items.iterrows():
        wave = data.load_audio(clip["path"], channel="near")
        np.testing.assert_allclose(emb[row], _expected(embedder, wave, pooling), atol=1e-5)
    _, flat = embed.compute_embeddings(embedder, clips, **KW)  # the head, as before: 2-D
    assert flat.shape == (len(clips), 8)


def test_windowed_per_band_embedding_is_the_per_band_mean_of_its_windows(clips):
    embedder = _cnn_embedder()
    clip = clips.iloc[:1].reset_index(drop=True)
    _, emb = embed.compute_embeddings(
        embedder, clip, pooling="band_rdp", rdp_gamma=2.0, window_seconds=0.25, window_hop=0.125, **KW
    )
    wave = data.load_audio(clip["path"][0], channel="near")
    starts = embed.window_starts(len(wave), SR // 4, SR // 8)
    assert len(starts) == 3 and emb.ndim == 3
    windows = [_expected(embedder, wave[s : s + SR // 4], "band_rdp", 2.0) for s in starts]
    np.testing.assert_allclose(emb[0], np.mean(windows, axis=0), atol=1e-5)


def test_cache_key_holds_pooling_and_gamma_and_load_returns_3d(clips, tmp_path):
    embedder = _cnn_embedder()
    head_items, head_emb, head_folder = embed.extract(embedder, clips, tmp_path, "x", **KW)
    folders = {"head": head_folder}
    for pooling, gamma in (("band_rdp", 4.0), ("band_rdp", 2.0), ("band_mean", 4.0)):
        _, emb, folder = embed.extract(embedder, clips, tmp_path, "x", pooling=pooling, rdp_gamma=gamma, **KW)
        folders[(pooling, gamma)] = folder
        items, loaded = embed.load(folder)
        assert loaded.ndim == 3 and np.array_equal(loaded, emb)
    assert len(set(folders.values())) == 4
    # the mean does not use gamma: another gamma is the same cache
    mean_again = embed.extract(embedder, clips, tmp_path, "x", pooling="band_mean", rdp_gamma=2.0, **KW)[2]
    assert mean_again == folders[("band_mean", 4.0)]
    stamp = (folders[("band_rdp", 4.0)] / "emb.npy").stat().st_mtime_ns
    again = embed.extract(embedder, clips, tmp_path, "x", pooling="band_rdp", **KW)[2]
    assert again == folders[("band_rdp", 4.0)] and (again / "emb.npy").stat().st_mtime_ns == stamp
    assert embed.load(head_folder)[1].shape == head_emb.shape == (len(clips), 8)


def test_collapse_is_measured_on_the_clip_vector_of_3d_embeddings(clips):
    items = clips.assign(channel="near")
    rng = np.random.default_rng(0)
    spread = rng.standard_normal((len(items), 4, 3)).astype(np.float32)
    figures = embed.check_collapse(items, spread, "x_rdp")
    assert figures["near"] == pytest.approx(embed.collapse_figure(spread.reshape(len(items), -1)))
    same = np.broadcast_to(spread[:1], spread.shape) + 1e-7 * spread
    with pytest.warns(UserWarning, match="x_rdp: the near embeddings have collapsed"):
        embed.check_collapse(items, same, "x_rdp")


class _NoGrid(Backbone):
    name = "gridless"
    embed_dim = 4

    def forward(self, waves, lengths=None, augment=None, reference=None, reference_lengths=None):
        return waves[:, :8, None].expand(-1, -1, 4), torch.zeros(waves.shape[0], 8, dtype=torch.bool)


def test_band_pooling_of_a_backbone_without_a_grid_names_it_and_the_setting(clips):
    embedder = models.Embedder(_NoGrid(), heads.make_head("mean", 4, 4))
    with pytest.raises(
        ValueError, match=r"pooling='band_rdp' .* gridless backbone has no time x frequency grid"
    ):
        embed.compute_embeddings(embedder, clips, pooling="band_rdp", **KW)
    _, emb = embed.compute_embeddings(embedder, clips, **KW)  # its head still works
    assert emb.shape == (len(clips), 4)


def test_extraction_settings_carry_pooling_and_gamma():
    settings = embed.ExtractConfig.from_dict({"pooling": "band_rdp", "rdp_gamma": 2})
    assert settings.pooling == "band_rdp" and settings.rdp_gamma == 2
    assert settings.to_dict()["pooling"] == "band_rdp"
    default = embed.ExtractConfig()
    assert (default.pooling, default.rdp_gamma) == ("head", 4.0)
    with pytest.raises(
        ValueError, match="extraction pooling 'rdp': expected one of head, band_mean, band_rdp"
    ):
        embed.ExtractConfig.from_dict({"pooling": "rdp"})
    with pytest.raises(ValueError, match="RDP gamma must be a finite number >= 0, got -1"):
        embed.ExtractConfig.from_dict({"rdp_gamma": -1})
    with pytest.raises(ValueError, match="band_pooling 'rdp': expected one of band_rdp, band_mean"):
        embed.band_branch_name("cnn", "rdp")
    assert embed.band_branch_name("cnn", "band_mean") == "cnn_bmean"


def test_embed_branch_records_the_per_band_branch_of_the_same_model_beside_its_head_branch(clips, tmp_path):
    embedder = _cnn_embedder()
    settings = embed.ExtractConfig(channels=("near", "far"), num_workers=0, rdp_gamma=3.0)
    items, emb, _ = embed.embed_branch(
        tmp_path,
        clips,
        "cnn",
        embedder,
        settings,
        band_pooling="band_rdp",
        backbone="cnn",
        model_dir=tmp_path / "cnn",
    )
    assert emb.ndim == 2 and len(emb) == len(items) == 2 * len(clips)  # the head branch: one vector a clip
    assert manifest.branch(tmp_path, "cnn")["parameters"] == sum(p.numel() for p in embedder.parameters())
    entry = manifest.branch(tmp_path, "cnn_rdp")
    assert entry["band_of"] == "cnn" and entry["model_dir"] == "cnn"
    assert entry["extraction"] == dataclasses.replace(settings, pooling="band_rdp").to_dict()
    assert entry["parameters"] == sum(p.numel() for p in embedder.backbone.parameters())
    assert set(entry["collapse"]) == {"near", "far"}
    items, emb = embed.load(manifest.embedding_folder(tmp_path, "cnn_rdp"))
    assert emb.shape == (2 * len(clips), 4, 8) and list(items["channel"].unique()) == ["near", "far"]


@pytest.mark.filterwarnings("ignore")
def test_notebook_07_records_the_head_and_the_per_band_branch(clips, tmp_path):
    """Notebook 07 with band_pooling: one trained CNN, two branches (head [N, D], per band [N, F, D])."""
    run_dir = tmp_path / "run"
    root = clips["path"].iloc[0].split("/dev_data/")[0]
    overrides = [
        "07.training.backbone_config=unit",
        "07.training.steps=4",
        "07.training.batch_size=4",
        "07.extraction.channels=[near]",
        "07.band_pooling=band_rdp",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.run_recipe("default", root, run_dir, overrides=overrides, only=["01", "07"])
    branches = manifest.read(run_dir)["branches"]
    assert set(branches) == {"cnn", "cnn_rdp"}
    assert branches["cnn_rdp"]["extraction"]["pooling"] == "band_rdp"
    assert branches["cnn"]["extraction"]["pooling"] == "head"
    assert branches["cnn_rdp"]["model_dir"] == branches["cnn"]["model_dir"] == "cnn"
    head_items, head_emb = embed.load(manifest.embedding_folder(run_dir, "cnn"))
    band_items, band_emb = embed.load(manifest.embedding_folder(run_dir, "cnn_rdp"))
    unit = cnn.CONFIGS["unit"]
    assert head_emb.shape == (len(clips), 128) and band_items.equals(head_items)
    assert band_emb.shape == (len(clips), unit.n_mels >> len(unit.channels), unit.channels[-1])
