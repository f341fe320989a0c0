"""Fine-tuning: the loss falls and classes separate; resume is exact; LoRA trains only adapters;
DDP with two gloo processes follows the same loss trend; embeddings are cached."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from kit import backbones, data, embed, models, train

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
    embedder = models.load_embedder(out)
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
    before = {k: v.clone() for k, v in models.build_embedder(cfg).backbone.state_dict().items()}
    out = train.train(tone_index, cfg, tmp_path, progress=False)
    model = models.load_embedder(out)
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
    with pytest.raises(
        ValueError, match=r"unknown training setting\(s\) \['stepz'\]; valid settings: .*'steps'"
    ):
        train.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="label scheme"):
        train.TrainConfig.from_dict({"label_scheme": "attributes"})
    with pytest.raises(ValueError, match="head_lr_scale must be > 0"):
        train.TrainConfig.from_dict({"head_lr_scale": 0})
    with pytest.raises(ValueError, match="mode"):
        train.TrainConfig.from_dict({"mode": "half"})
    with pytest.raises(ValueError, match="channels"):
        train.TrainConfig.from_dict({"channels": ["left"]})
    with pytest.raises(FileNotFoundError, match="model.pt"):
        models.load_embedder(tmp_path / "nothing")


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_embedding_cache_is_reused(tone_index, tmp_path):
    torch.manual_seed(0)
    embedder = models.build_embedder(_cfg())
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
    embedder = models.build_embedder(_cfg()).eval()
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
    embedder = models.build_embedder(_cfg())
    mono = tone_index.assign(channels=1)
    with pytest.raises(ValueError, match="is mono"):
        embed.compute_embeddings(embedder, mono, channels=("near", "far"), progress=False)
    with pytest.raises(FileNotFoundError, match="not an embedding folder"):
        embed.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="run its notebook first"):
        embed.latest(tmp_path, "beats")


def test_training_items_carry_their_true_length(tone_index):
    """A 1-s clip cropped to 1.5 s is zero-padded: its valid length is 1 s, so the backbone masks the
    padding, unless the recipe feeds the padding as input (EAT-ASP: mask_padding=False)."""
    items = tone_index.assign(channel="near").iloc[:3]
    codes = np.zeros(len(items), dtype=np.int64)
    length = data.LengthPolicy(mode="pad_or_cut", seconds=1.5)
    masked = train.TrainItems(items, codes, length, [items["path"].iloc[0]], mask_padding=True)
    as_input = train.TrainItems(items, codes, length, [], mask_padding=False)
    waves, valid, noise, noise_valid, _ = train._collate([masked[(0, 1)], masked[(1, 2)]])
    assert waves.shape == (2, 24000) and valid.tolist() == [SR, SR] and noise_valid.tolist() == [SR, SR]
    assert waves[:, SR:].abs().max() == 0 and noise.shape == (2, 24000)
    _, valid, _, noise_valid, _ = train._collate([as_input[(0, 1)]])
    assert valid.tolist() == [24000] and noise_valid.tolist() == [0]


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_padding_is_masked_at_extraction_unless_fed_as_input(tone_index):
    """Padded to 1.5 s with the padding masked, a clip embeds as the clip alone (the backbones are batch
    invariant); fed as input, the zeros change the embedding. A fixed-length backbone that would cut the
    input warns."""
    torch.manual_seed(0)
    embedder = models.build_embedder(_cfg(head="mean")).eval()
    clips = tone_index.iloc[:2]
    kwargs = dict(channels=("near",), progress=False)
    _, plain = embed.compute_embeddings(embedder, clips, **kwargs)
    padded = dict(length_mode="pad_or_cut", seconds=1.5)
    _, masked = embed.compute_embeddings(embedder, clips, **padded, **kwargs)
    _, as_input = embed.compute_embeddings(embedder, clips, **padded, mask_padding=False, **kwargs)
    np.testing.assert_allclose(masked, plain, atol=1e-5)
    assert np.abs(as_input - plain).max() > 1e-3
    eat = models.build_embedder(_cfg(backbone="eat", backbone_options={"target_length": 64})).eval()
    with pytest.warns(UserWarning, match="at most 0.64 s of input"):
        embed.compute_embeddings(eat, clips, **kwargs)


def test_extraction_settings_are_checked():
    settings = embed.ExtractConfig.from_dict(
        {"length_mode": "pad_or_cut", "seconds": 16.0, "channels": "near"}
    )
    assert settings.channels == ("near",) and settings.length_policy().n_samples == 16 * SR
    with pytest.raises(ValueError, match=r"unknown extraction setting\(s\) \['window'\]; valid settings"):
        embed.ExtractConfig.from_dict({"window": 5.0})
    with pytest.raises(ValueError, match="needs seconds"):
        embed.ExtractConfig.from_dict({"length_mode": "pad_or_cut"})


# --------------------------------------------------------------------------------------------------
# Resume, checkpoints and failures (issue: fast on the GPUs users have)
# --------------------------------------------------------------------------------------------------


def _weights(folder: Path) -> dict:
    return torch.load(folder / "model.pt", weights_only=True)["state"]


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_resumed_run_with_other_workers_ends_with_identical_weights(tone_index, tmp_path):
    cfg = _cfg(steps=6, checkpoint_every=None, num_workers=0, spec_augment=True, mixup_alpha=0.4)
    whole = train.train(tone_index, cfg, tmp_path / "whole", progress=False)
    part = train.train(tone_index, cfg, tmp_path / "split", progress=False, stop_after=2)
    assert (part / "checkpoints" / "last.pt").exists()  # written at the end of the call, by time otherwise
    resumed = dataclasses.replace(cfg, num_workers=2, prefetch_factor=3, checkpoint_minutes=5.0)
    train.train(tone_index, resumed, tmp_path / "split", progress=False)
    a, b = _weights(whole), _weights(part)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert not (part / "checkpoints" / "last.pt").exists()  # only model.pt stays (keep_checkpoint=False)
    history = pd.read_csv(part / "history.csv")
    assert history["step"].tolist() == list(range(1, 7)) and (history["seconds"] > 0).all()


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_changed_settings_are_refused_by_name_and_a_finished_run_is_not_retrained(tone_index, tmp_path):
    cfg = _cfg(steps=3)
    train.train(tone_index, cfg, tmp_path, progress=False, stop_after=1)
    with pytest.raises(
        ValueError, match=r"other training settings \(lr: 0.001 -> 0.0005\); use another name"
    ):
        train.train(tone_index, dataclasses.replace(cfg, lr=5e-4), tmp_path, progress=False)
    out = train.train(tone_index, cfg, tmp_path, progress=False)
    stamp = (out / "model.pt").stat().st_mtime_ns
    assert train.train(tone_index, dataclasses.replace(cfg, num_workers=1), tmp_path, progress=False) == out
    assert (out / "model.pt").stat().st_mtime_ns == stamp  # found finished: not trained again
    with pytest.raises(
        ValueError, match=r"model.pt was written with other training settings \(steps: 3 -> 4\)"
    ):
        train.train(tone_index, dataclasses.replace(cfg, steps=4), tmp_path, progress=False)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_moved_pretrained_checkpoint_with_the_same_content_resumes(tone_index, tmp_path, backbone_fixtures):
    first, moved = tmp_path / "a" / "BEATs.pt", tmp_path / "b" / "BEATs.pt"
    for path in (first, moved):
        path.parent.mkdir()
        shutil.copy(backbone_fixtures / "beats_release.pt", path)
    cfg = _cfg(steps=2, checkpoint=str(first), backbone_config=None)
    train.train(tone_index, cfg, tmp_path / "run", progress=False, stop_after=1)
    first.unlink()
    train.train(tone_index, dataclasses.replace(cfg, checkpoint=str(moved)), tmp_path / "run", progress=False)
    other = tmp_path / "c" / "BEATs.pt"
    other.parent.mkdir()
    torch.save({**torch.load(moved, weights_only=True), "extra": 1}, other)
    with pytest.raises(
        ValueError, match=r"other training settings \(checkpoint: .*b/BEATs.pt' -> .*c/BEATs.pt'\)"
    ):
        train.train(
            tone_index, dataclasses.replace(cfg, checkpoint=str(other)), tmp_path / "run", progress=False
        )


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_checkpoints_follow_the_clock(tone_index, tmp_path, monkeypatch):
    saved = []
    real = train._save_checkpoint
    monkeypatch.setattr(
        train, "_save_checkpoint", lambda path, *a, **k: (saved.append(a[4]), real(path, *a, **k))
    )
    train.train(
        tone_index,
        _cfg(steps=4, checkpoint_every=None, checkpoint_minutes=60.0),
        tmp_path / "a",
        progress=False,
    )
    assert saved == [4]  # only at the end
    saved.clear()
    train.train(
        tone_index,
        _cfg(steps=4, checkpoint_every=None, checkpoint_minutes=1e-9),
        tmp_path / "b",
        progress=False,
    )
    assert saved == [1, 2, 3, 4]  # the interval passed after every step


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_nan_loss_stops_with_the_step_and_what_to_try(tone_index, tmp_path, monkeypatch):
    real = train.ProxyTask.forward
    calls = []

    def forward(self, *args, **kwargs):
        loss, acc = real(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), acc

    monkeypatch.setattr(train.ProxyTask, "forward", forward)
    cfg = _cfg(steps=6, checkpoint_every=1)
    with pytest.raises(
        FloatingPointError,
        match=r"loss became nan at step 3 \(fp32\); the last finite loss was .* at step 2.*lower lr",
    ):
        train.train(tone_index, cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "t" / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 2  # the diverged step never reached a checkpoint


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # a skipped fp16 step
def test_the_fp16_scaler_path_trains_on_the_cpu(tone_index, tmp_path, monkeypatch):
    from kit import precision

    forced = precision.Precision("fp16", "cpu", reason="forced by the test")
    monkeypatch.setattr(precision, "resolve", lambda *a, **k: forced)
    out = train.train(tone_index, _cfg(steps=3), tmp_path, progress=False)
    assert forced.scaler.is_enabled() and forced.scaler.get_scale() > 0
    assert all(torch.isfinite(v).all() for v in _weights(out).values())


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tone_index, tmp_path, monkeypatch):
    cfg = _cfg(steps=4, checkpoint_every=1)
    train.train(tone_index, cfg, tmp_path, progress=False, stop_after=1)
    before = (tmp_path / "t" / "checkpoints" / "last.pt").read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OSError, match=r"cannot write the checkpoint .*last.pt \(No space left on device\); the previous"
    ):
        train.train(tone_index, cfg, tmp_path, progress=False)
    assert (tmp_path / "t" / "checkpoints" / "last.pt").read_bytes() == before
    assert [p.name for p in (tmp_path / "t" / "checkpoints").iterdir()] == ["last.pt"]  # no temporary left


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_an_unreadable_clip_in_a_loader_worker_is_named(tone_index, tmp_path):
    broken = tone_index.copy()
    bad = tmp_path / "section_00_source_train_normal_0099_spd_1.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    broken.loc[broken.index, "path"] = str(bad)
    with pytest.raises(Exception, match=r"unreadable or corrupt audio file .*0099_spd_1.wav"):
        train.train(broken, _cfg(steps=2, num_workers=1), tmp_path, progress=False)
    assert not (tmp_path / "t" / "checkpoints" / "last.pt").exists()


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_release_size_model_refuses_to_train_on_the_cpu_unless_allowed(tone_index, tmp_path, monkeypatch):
    from kit import precision

    monkeypatch.setattr(precision, "RELEASE_SIZE_PARAMETERS", 1000)  # the unit model counts as release size
    with pytest.raises(
        RuntimeError, match=r"M-parameter backbone on a CPU takes days; use a GPU .*allow_cpu: true"
    ):
        train.train(tone_index, _cfg(steps=1), tmp_path, progress=False)
    assert (
        train.train(tone_index, _cfg(steps=1, allow_cpu=True), tmp_path, progress=False) / "model.pt"
    ).exists()


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_canceller_is_a_channel_like_any_other(tone_index, tmp_path):
    """Training and extraction take a far-channel canceller by name; its embedding is the embedding of
    the cancelled clip; its settings are part of the cache key; a mono clip gets a clear error."""
    from kit import denoise

    out = train.train(tone_index, _cfg(steps=2, channels=("near", "w1")), tmp_path, progress=False)
    embedder = models.load_embedder(out)
    clips = tone_index.iloc[:3]
    meta, emb, folder = embed.extract(embedder, clips, tmp_path, "x", channels=("near", "w1"), progress=False)
    assert meta["channel"].tolist() == ["near"] * 3 + ["w1"] * 3
    pair = data.load_audio(clips["path"].iloc[1], channel="both")
    cancelled = torch.from_numpy(denoise.cancel_numpy(pair, "w1"))[None]
    with torch.no_grad():
        expected = embedder(cancelled, torch.tensor([cancelled.shape[1]])).numpy()[0]
    np.testing.assert_allclose(emb[4], expected, atol=1e-5)
    stronger = embed.extract(
        embedder,
        clips,
        tmp_path,
        "x",
        channels=("near", "w1"),
        canceller_settings={"w1": {"eps": 1e-2}},
        progress=False,
    )
    assert stronger[2] != folder and not np.allclose(stronger[1][3:], emb[3:])
    with pytest.raises(ValueError, match="unknown channel 'w9'"):
        embed.ExtractConfig.from_dict({"channels": ["near", "w9"]})
    mono = clips.assign(channels=1)
    with pytest.raises(ValueError, match=r"channel\(s\) \[.w1.\] need the far microphone but .* is mono"):
        embed.compute_embeddings(embedder, mono, channels=("w1",), progress=False)
    with pytest.raises(ValueError, match=r"channel\(s\) \[.ss.\] need the far microphone"):
        train.training_items(mono, _cfg(channels=("ss",)))


def test_collapsed_embeddings_are_measured_and_named(tmp_path, capsys):
    from kit import manifest

    rng = np.random.default_rng(0)
    spread = rng.normal(size=(50, 16))
    assert abs(embed.collapse_figure(spread)) < 0.1
    collapsed = np.ones((50, 16)) + 1e-6 * rng.normal(size=(50, 16))
    assert embed.collapse_figure(collapsed) > 0.9999
    direction = rng.normal(size=16)
    exact = spread.copy()
    exact[:] = direction  # mean of the off-diagonal cosines of identical rows is 1
    assert embed.collapse_figure(exact) == pytest.approx(1.0)
    meta = pd.DataFrame({"channel": ["near"] * 50 + ["far"] * 50})
    with pytest.warns(
        UserWarning, match=r"x: the far embeddings have collapsed \(mean cosine similarity 1.0000"
    ):
        figures = embed.check_collapse(meta, np.concatenate([spread, collapsed]), "x")
    assert figures["near"] < 0.1 and figures["far"] > 0.999
    manifest.record_branch(tmp_path, "x", collapse=figures, parameters=1)
    manifest.record_branch(tmp_path, "y", collapse={"near": 0.2}, parameters=1)
    assert manifest.notes(tmp_path, ["x-knn-near", "y-knn-near", "baseline-MSE"]) == {
        "x-knn-near": f"collapsed embeddings: far mean cosine {figures['far']:.6f}"
    }


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_training_that_collapses_says_so(tone_index, tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "COLLAPSE_COSINE", -1.0)  # every model counts as collapsed
    with pytest.warns(
        UserWarning, match=r"t: after training, the embeddings of 24 training clips have collapsed .*lower lr"
    ):
        train.train(tone_index, _cfg(steps=1), tmp_path, progress=False)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_lora_targets_choose_the_adapted_modules():
    cfg = _cfg(
        backbone="beats", mode="lora", lora_rank=2, lora_targets=r"encoder\.layers\.\d+\.self_attn\.v_proj"
    )
    names = {
        n.rsplit(".lora_", 1)[0] for n, _ in models.build_embedder(cfg).named_parameters() if "lora_A" in n
    }
    assert names and all(name.endswith("self_attn.v_proj") for name in names)
    with pytest.raises(ValueError, match="lora_targets 'nothing' matches no module"):
        models.build_embedder(_cfg(backbone="beats", mode="lora", lora_targets="nothing"))


def test_a_setting_added_after_a_run_was_saved_counts_as_its_default():
    cfg = train.TrainConfig()
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("grad_clip", "lora_targets")}
    assert cfg.differences(saved) == []
    assert train.TrainConfig(grad_clip=1.0).differences(saved) == ["grad_clip"]


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_subcluster_adacos_trains_and_classes_separate(tone_index, tmp_path):
    cfg = _cfg(loss="subcluster_adacos", subcenters=4, name="scadacos")
    out = train.train(tone_index, cfg, tmp_path, progress=False)
    history = pd.read_csv(out / "history.csv")
    # the adaptive scale keeps the loss from falling as far as a fixed scale's (as with AdaCos)
    assert history["loss"].iloc[-8:].mean() < 0.75 * history["loss"].iloc[:8].mean()
    meta, emb = embed.compute_embeddings(
        models.load_embedder(out), tone_index, channels=("near",), progress=False
    )
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    labels = (meta["machine"] + meta["attributes"]).to_numpy()
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    assert (labels[sim.argmax(1)] == labels).mean() >= 0.9
    state = torch.load(tmp_path / "scadacos" / "model.pt", weights_only=False)
    assert not any(key.startswith("loss.") for key in state["state"])  # the loss stays out of model.pt


def test_pseudo_label_settings_are_training_settings():
    cfg = train.TrainConfig(label_scheme="pseudo")
    assert (cfg.pseudo_k_source, cfg.pseudo_k_target, cfg.pseudo_seed, cfg.pseudo_features) == (
        7,
        1,
        42,
        "backbone",
    )
    assert "pseudo_k_source" not in train.TrainConfig.EXECUTION_FIELDS
    saved = {k: v for k, v in cfg.to_dict().items() if not k.startswith("pseudo_")}  # a run saved before them
    assert cfg.differences(saved) == []
    assert train.TrainConfig(label_scheme="pseudo", pseudo_k_source=5).differences(saved) == [
        "pseudo_k_source"
    ]
    assert train._loss_kwargs(train.TrainConfig(loss="subcluster_adacos", subcenters=16)) == {"k": 16}
    with pytest.raises(ValueError, match="unknown label scheme 'pseudo_attribute'"):
        train.TrainConfig.from_dict({"label_scheme": "pseudo_attribute"})


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_mixup_prob_mixes_a_share_of_the_batches_and_resumes_exactly(tone_index, tmp_path):
    def weights(folder):
        return torch.load(folder / "model.pt", weights_only=False)["state"]

    none = train.train(tone_index, _cfg(steps=3, name="a"), tmp_path / "a", progress=False)
    never = train.train(
        tone_index, _cfg(steps=3, name="b", mixup_alpha=0.4, mixup_prob=0.0), tmp_path / "b", progress=False
    )
    for key, value in weights(none).items():
        torch.testing.assert_close(weights(never)[key], value, rtol=0, atol=0, msg=key)
    cfg = _cfg(steps=6, checkpoint_every=2, mixup_alpha=0.4, mixup_prob=0.5, name="c")
    whole = train.train(tone_index, cfg, tmp_path / "whole", progress=False)
    train.train(tone_index, cfg, tmp_path / "split", progress=False, stop_after=3)
    split = train.train(tone_index, cfg, tmp_path / "split", progress=False)
    for key, value in weights(whole).items():
        torch.testing.assert_close(weights(split)[key], value, rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="mixup_prob must be in"):
        train.TrainConfig.from_dict({"mixup_prob": 1.5})


def test_extraction_takes_one_settings_object_and_names_a_wrong_field(tone_index, tmp_path):
    embedder = models.statistics_embedder()
    settings = embed.ExtractConfig(channels=("near",), num_workers=0)
    _, by_object = embed.compute_embeddings(embedder, tone_index, settings, progress=False)
    _, by_field = embed.compute_embeddings(
        embedder, tone_index, channels=("near",), num_workers=0, progress=False
    )
    np.testing.assert_array_equal(by_object, by_field)
    with pytest.raises(ValueError, match=r"unknown extraction setting\(s\) \['chanels'\]"):
        embed.extract(embedder, tone_index, tmp_path, "x", settings, chanels=("near",))
    with pytest.raises(TypeError, match="must be a kit.embed.ExtractConfig"):
        embed.compute_embeddings(embedder, tone_index, {"channels": ["near"]})


def test_the_model_settings_are_one_object_the_training_config_holds():
    cfg = _cfg(mode="lora", lora_rank=4, head="asp", embed_dim=32)
    model = cfg.model
    assert isinstance(model, models.ModelConfig)
    assert (model.backbone, model.mode, model.lora_rank, model.head, model.embed_dim) == (
        "beats",
        "lora",
        4,
        "asp",
        32,
    )
    assert set(models.ModelConfig.fields()) <= set(train.TrainConfig.fields())
    assert models.ModelConfig.of(cfg.to_dict()) == model


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_a_moved_model_folder_names_the_checkpoint_it_needs(tone_index, tmp_path, backbone_fixtures):
    """A LoRA model folder holds the adapters, not the frozen BEATs weights: moved without the release
    file it says which file and why; given that file elsewhere it loads the same model; given another
    file it refuses it."""
    release = tmp_path / "release" / "beats_release.pt"
    release.parent.mkdir()
    shutil.copy(backbone_fixtures / "beats_release.pt", release)
    cfg = _cfg(backbone_config=None, checkpoint=str(release), mode="lora", lora_rank=2, steps=2, name="moved")
    out = train.train(tone_index, cfg, tmp_path / "run", progress=False)
    waves, lengths = torch.randn(1, SR) * 0.1, torch.tensor([SR])
    with torch.no_grad():
        expected = models.load_embedder(out)(waves, lengths)
    elsewhere = shutil.copytree(out, tmp_path / "other_machine" / "moved")
    moved = release.rename(tmp_path / "kept.pt")  # the release file is gone from where it was
    with pytest.raises(
        backbones.CheckpointNotFoundError, match=r"beats_release\.pt \(sha1 [0-9a-f]{40}\), which is not here"
    ):
        models.load_embedder(elsewhere)
    with torch.no_grad():
        again = models.load_embedder(elsewhere, checkpoint=moved)(waves, lengths)
    torch.testing.assert_close(again, expected)
    with pytest.raises(ValueError, match="is not the checkpoint"):
        models.load_embedder(elsewhere, checkpoint=backbone_fixtures / "beats_variant.pt")


def test_a_config_saved_with_the_old_canceller_settings_name_loads():
    cfg = train.TrainConfig.from_dict({"front_end_settings": {"w1": {"eps": 0.01}}, "amp": False})
    assert cfg.canceller_settings == {"w1": {"eps": 0.01}} and cfg.precision == "fp32"


def test_a_run_saved_with_the_old_canceller_settings_name_resumes_as_the_same_settings():
    cfg = train.TrainConfig(canceller_settings={"w1": {"eps": 0.01}})
    saved = {("front_end_settings" if k == "canceller_settings" else k): v for k, v in cfg.to_dict().items()}
    assert cfg.differences(saved) == []
