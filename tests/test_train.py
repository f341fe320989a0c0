"""Fine-tuning: the loss falls and classes separate; resume is exact; LoRA trains only adapters;
DDP with two gloo processes follows the same loss trend; embeddings are cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from kit import data, embed, train

SR = 16000
REPO = Path(__file__).resolve().parents[1]


def _tone_dataset(root: Path, n_per_class: int = 6, seconds: float = 1.0) -> pd.DataFrame:
    """Two machines x two attribute values; each class a distinct tone (near) plus noise (far)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    freqs = {
        ("fan", "spd_1"): 300.0,
        ("fan", "spd_2"): 900.0,
        ("valve", "pat_A"): 2000.0,
        ("valve", "pat_B"): 4500.0,
    }
    for (machine, attr), f0 in freqs.items():
        folder = root / "dev_data" / "raw" / machine / "train"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            near = 0.3 * np.sin(
                2 * np.pi * f0 * (1 + 0.01 * rng.standard_normal()) * t
            ) + 0.02 * rng.standard_normal(len(t))
            far = 0.1 * near + 0.05 * rng.standard_normal(len(t))
            number = i + (n_per_class if attr.endswith(("2", "B")) else 0)
            name = f"section_00_source_train_normal_{number:04d}_{attr}.wav"
            sf.write(folder / name, np.stack([near, far], 1).astype(np.float32), SR, subtype="PCM_16")
    return data.build_index(root, progress=False)


@pytest.fixture(scope="module")
def tone_index(tmp_path_factory):
    return _tone_dataset(tmp_path_factory.mktemp("tones"))


def _cfg(**kw) -> train.TrainConfig:
    base = dict(
        name="t",
        backbone="beats",
        backbone_config="unit",
        embed_dim=16,
        head="mean",
        loss="arcface",
        loss_s=16.0,
        loss_m=0.2,
        label_scheme="attribute",
        channels=("near",),
        train_datasets=("dev",),
        length_mode="random_crop",
        crop_seconds=0.6,
        steps=40,
        batch_size=8,
        lr=1e-3,
        warmup_steps=4,
        checkpoint_every=10,
        seed=0,
        spec_augment=False,
    )
    base.update(kw)
    return train.TrainConfig.from_dict(base)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_loss_falls_and_classes_separate(tone_index, tmp_path):
    out = train.train(tone_index, _cfg(), tmp_path, progress=False)
    history = pd.read_csv(out / "history.csv")
    assert history["loss"].iloc[-8:].mean() < 0.6 * history["loss"].iloc[:8].mean()
    assert (out / "training_curves.png").stat().st_size > 0
    embedder = train.load_embedder(out)
    meta, emb = embed.compute_embeddings(embedder, tone_index, channels=("near",), progress=False)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    labels = (meta["machine"] + meta["attributes"]).to_numpy()
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nearest = labels[sim.argmax(1)]
    assert (nearest == labels).mean() >= 0.9  # leave-one-out 1-NN recovers the class


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tone_index, tmp_path):
    cfg = _cfg(
        steps=8,
        checkpoint_every=2,
        spec_augment=True,
        mixup_alpha=0.4,
        noise_mix_prob=0.5,
        channels=("near", "far"),
        label_scheme="composite",
    )
    whole = train.train(tone_index, cfg, tmp_path / "whole", progress=False)
    part = train.train(tone_index, cfg, tmp_path / "split", progress=False, stop_after=3)
    assert not (part / "model.pt").exists()
    train.train(tone_index, cfg, tmp_path / "split", progress=False)
    a = torch.load(whole / "model.pt", weights_only=False)["state"]
    b = torch.load(part / "model.pt", weights_only=False)["state"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
@pytest.mark.parametrize("backbone", ["beats", "eat", "fisher"])
def test_lora_trains_adapters_only(tone_index, tmp_path, backbone):
    cfg = _cfg(backbone=backbone, mode="lora", lora_rank=4, steps=3, name=f"lora_{backbone}")
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in train.build_embedder(cfg).backbone.state_dict().items()}
    out = train.train(tone_index, cfg, tmp_path, progress=False)
    model = train.load_embedder(out)
    after = model.backbone.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys and all(k in after for k in lora_keys)
    changed = [k for k in lora_keys if "lora_B" in k and after[k].abs().sum() > 0]
    assert changed, "LoRA B matrices stayed at their zero initialisation"
    for key, value in before.items():
        if "lora_" not in key:
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=f"frozen weight {key} changed")
    assert (out / "lora_adapters.safetensors").exists()
    # adapters are small beside the frozen weights
    assert (out / "lora_adapters.safetensors").stat().st_size < sum(v.numel() * 4 for v in before.values())


def test_bad_configuration_is_named(tone_index, tmp_path):
    with pytest.raises(ValueError, match="unknown training parameter"):
        train.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="mode"):
        train.TrainConfig.from_dict({"mode": "half"})
    with pytest.raises(ValueError, match="channels"):
        train.TrainConfig.from_dict({"channels": ["left"]})
    with pytest.raises(FileNotFoundError, match="model.pt"):
        train.load_embedder(tmp_path / "nothing")


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_embedding_cache_is_reused(tone_index, tmp_path):
    torch.manual_seed(0)
    embedder = train.build_embedder(_cfg())
    meta, emb, folder = embed.extract(
        embedder, tone_index, tmp_path, "x", channels=("near", "far"), progress=False
    )
    assert len(meta) == 2 * len(tone_index) and set(meta["channel"]) == {"near", "far"}
    stamp = (folder / "emb.npy").stat().st_mtime_ns
    meta2, emb2, folder2 = embed.extract(
        embedder, tone_index, tmp_path, "x", channels=("near", "far"), progress=False
    )
    assert folder2 == folder and (folder / "emb.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(emb, emb2)
    with torch.no_grad():
        for p in embedder.head.parameters():
            p.add_(1.0)
    _, _, folder3 = embed.extract(
        embedder, tone_index, tmp_path, "x", channels=("near", "far"), progress=False
    )
    assert folder3 != folder  # new weights, new cache entry
    assert embed.latest(tmp_path, "x") == folder3


def test_window_starts_cover_the_clip():
    assert embed.window_starts(100, 40, 20).tolist() == [0, 20, 40, 60]
    assert embed.window_starts(110, 40, 30).tolist() == [0, 30, 60, 70]  # the last ends at the end
    assert embed.window_starts(30, 40, 20).tolist() == [0]  # shorter than a window: the clip itself


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_windowed_embedding_is_the_mean_of_its_windows(tone_index, tmp_path):
    torch.manual_seed(0)
    embedder = train.build_embedder(_cfg()).eval()
    clips = tone_index.iloc[:3].reset_index(drop=True)
    meta, emb = embed.compute_embeddings(
        embedder, clips, channels=("near",), window_seconds=0.5, window_hop=0.25, progress=False
    )
    assert len(meta) == 3
    for row, clip in clips.iterrows():
        wave = data.load_audio(clip["path"], channel="near")
        starts = embed.window_starts(len(wave), SR // 2, SR // 4)
        assert len(starts) == 3  # a 1-s clip: windows at 0, 0.25 and 0.5 s
        windows = torch.stack([torch.from_numpy(wave[s : s + SR // 2]).float() for s in starts])
        with torch.no_grad():
            expected = embedder(windows, torch.full((len(starts),), SR // 2)).mean(0).numpy()
        np.testing.assert_allclose(emb[row], expected, atol=1e-5)
    whole, _, folder = embed.extract(embedder, clips, tmp_path, "x", channels=("near",), progress=False)
    windowed = embed.extract(
        embedder, clips, tmp_path, "x", channels=("near",), window_seconds=0.5, progress=False
    )
    assert windowed[2] != folder  # the windowing is part of the cache key
    with pytest.raises(ValueError, match="window_seconds and window_hop must be > 0"):
        embed.compute_embeddings(embedder, clips, channels=("near",), window_seconds=0.0, progress=False)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_ddp_two_gloo_processes_follow_the_single_process_trend(tone_index, tmp_path):
    index_path = data.save_index(tone_index, tmp_path)
    cfg = _cfg(steps=16, batch_size=4, name="ddp").to_dict()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "kit.train",
        str(tmp_path / "cfg.yaml"),
        "--index",
        str(index_path),
        "--run-dir",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = pd.read_csv(tmp_path / "ddp" / "ddp" / "history.csv")
    single_cfg = _cfg(steps=16, batch_size=8, name="single")
    single = pd.read_csv(
        train.train(tone_index, single_cfg, tmp_path / "one", progress=False) / "history.csv"
    )
    for history in (ddp, single):
        assert history["loss"].iloc[-4:].mean() < history["loss"].iloc[:4].mean()
    # two ranks of 4 clips see the same global batch size as one process of 8: similar loss levels
    assert (
        abs(ddp["loss"].iloc[-4:].mean() - single["loss"].iloc[-4:].mean())
        < 0.5 * single["loss"].iloc[:4].mean()
    )


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_embedding_bad_input_is_named(tone_index, tmp_path):
    torch.manual_seed(0)
    embedder = train.build_embedder(_cfg())
    mono = tone_index.assign(channels=1)
    with pytest.raises(ValueError, match="is mono"):
        embed.compute_embeddings(embedder, mono, channels=("near", "far"), progress=False)
    with pytest.raises(FileNotFoundError, match="not an embedding folder"):
        embed.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="run its notebook first"):
        embed.latest(tmp_path, "beats")
