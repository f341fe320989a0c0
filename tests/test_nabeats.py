"""NA-BEATs reproduces the authors' outputs on a release-format checkpoint (``shared/fixtures/nabeats``),
is exact under padding, reads the Lightning checkpoint without running its pickle, finds its base
file, and refuses what it cannot load with a message that says why."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from kit import backbones, models
from kit.backbones import CheckpointError, beats, load, lora_targets, nabeats

ATOL = 1e-4
CKPT = "nabeats_tiny_seed0.ckpt"


@pytest.fixture(scope="session")
def fixtures(backbone_fixtures):
    folder = backbone_fixtures.parent / "nabeats"
    if not folder.is_dir():
        pytest.skip(f"NA-BEATs reference material not found at {folder}")
    return folder


@pytest.fixture(scope="module")
def expected(fixtures) -> dict:
    return {k: torch.from_numpy(v) for k, v in np.load(fixtures / "nabeats_expected.npz").items()}


@pytest.fixture(scope="module")
def model(fixtures):
    return load("nabeats", fixtures / CKPT).eval()


def _close(actual: torch.Tensor, wanted: torch.Tensor) -> None:
    torch.testing.assert_close(actual, wanted, rtol=0, atol=ATOL)


def _run(model, x, r, lengths=None, reference_lengths=None):
    with torch.no_grad():
        return model(x, lengths, reference=r, reference_lengths=reference_lengths)


@pytest.mark.parametrize("clip", ["clip1", "clip2"])
def test_every_intermediate_matches_the_authors(model, expected, clip):
    trace = {}
    with torch.no_grad():
        z, mask = model.encode(
            expected[f"{clip}/x"][None], None, expected[f"{clip}/n_ref"][None], trace=trace
        )
    names = [
        k.split("/", 1)[1]
        for k in expected
        if k.startswith(f"{clip}/") and k[len(clip) + 1 :] not in ("x", "n_ref", "z")
    ]
    assert len(names) >= (18 if clip == "clip1" else 6)
    for name in names:
        wanted = expected[f"{clip}/{name}"]
        got = trace[name]
        assert got.shape == wanted.shape, name
        _close(got, wanted)
    _close(z, expected[f"{clip}/z"])
    assert not mask.any()


def test_a_shorter_reference_and_a_batch_of_equal_lengths(model, expected):
    _close(_run(model, expected["clip1/x"][None], expected["clip2/n_ref"][None])[0], expected["mixlen/z"])
    x = torch.stack([expected["clip1/x"][:25600], expected["clip2/x"]])
    r = torch.stack([expected["clip1/n_ref"][:25600], expected["clip2/n_ref"]])
    _close(_run(model, x, r)[0], expected["batch_equal/z"])


def test_a_padded_batch_gives_each_clip_its_own_tokens(model, expected):
    """Near and reference padded (each with its own lengths): the valid tokens equal the single-clip
    runs, the token mask is time-major (the authors' optional path flags the wrong tokens, 80..95)."""
    x = torch.zeros(3, 32000)
    r = torch.zeros(3, 32000)
    x[0], r[0] = expected["clip1/x"], expected["clip1/n_ref"]
    x[1, :25600], r[1, :25600] = expected["clip2/x"], expected["clip2/n_ref"]
    x[2], r[2, :25600] = expected["clip1/x"], expected["clip2/n_ref"]  # the mixlen pair
    z, mask = _run(model, x, r, torch.tensor([32000, 25600, 32000]), torch.tensor([32000, 25600, 25600]))
    _close(z[0], expected["clip1/z"][0])
    _close(z[1, :72], expected["clip2/z"][0])
    _close(z[2], expected["mixlen/z"][0])
    assert mask.tolist() == [[False] * 96, [False] * 72 + [True] * 24, [False] * 96]
    assert torch.all(z[1, 72:] == 0)
    upstream = expected["batch_padded/token_padding_mask"][1]
    assert upstream[80:].all() and not upstream[:80].any()  # the authors' rule, not ours
    _close(z[0], expected["batch_padded/z"][0])


def test_grid_tokens_are_time_by_frequency(model, expected):
    x = torch.stack([expected["clip1/x"], torch.cat([expected["clip2/x"], torch.zeros(6400)])])
    r = torch.stack([expected["clip1/n_ref"], torch.cat([expected["clip2/n_ref"], torch.zeros(6400)])])
    lengths = torch.tensor([32000, 25600])
    with torch.no_grad():
        grid, grid_mask = model.grid_tokens(x, lengths, reference=r, reference_lengths=lengths)
    assert model.has_grid and grid.shape == (2, 12, 8, 64) and grid_mask.shape == (2, 12)
    _close(grid[0].reshape(96, 64), expected["clip1/z"][0])
    _close(grid[1, :9].reshape(72, 64), expected["clip2/z"][0])
    assert grid_mask.tolist() == [[False] * 12, [False] * 9 + [True] * 3]


def test_a_missing_or_mismatched_reference_is_refused(model, expected):
    x = expected["clip1/x"][None]
    with pytest.raises(ValueError, match="nabeats needs a noise reference"):
        model(x)
    with pytest.raises(ValueError, match="reference must be"):
        model(x, reference=torch.zeros(2, 32000))
    with pytest.raises(ValueError, match="reference clips"):
        model(x, reference=torch.zeros(1, 800))
    with pytest.raises(ValueError, match="takes no reference"):
        beats.build("unit")(x, reference=x)


def test_the_ema_weights_are_used_not_the_raw_training_weights(model, fixtures):
    raw = nabeats.read_lightning(fixtures / CKPT)
    name = "fusion_layers.1.ffn.up_proj.weight"
    loaded = model.state_dict()[name]
    assert torch.equal(loaded, raw["state_dict"]["model.encoder." + name])
    assert not torch.equal(loaded, raw["current_model_state"]["model.encoder." + name])
    kept = nabeats.read_lightning(fixtures / CKPT, keep=("state_dict",))  # what loading reads
    assert kept["optimizer_states"] is None and kept["current_model_state"] is None
    assert torch.equal(kept["state_dict"]["model.encoder." + name], loaded)
    assert raw["hyper_parameters"]["model_cfg"]["fusion_layer_cfg"]["attention_cfg"] == {
        "num_heads": 8,
        "dropout": 0.1,
    }


def test_the_interface_for_training(model):
    assert model.pretrained and model.takes_reference and model.embed_dim == 64
    assert model.blocks is model.fusion_layers and len(model.blocks) == 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fusion_layers.") for n in trainable)
    model.train()
    assert not model.base.training and model.fusion_layers[0].training
    model.eval()
    names = [f"base.encoder.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in ("q", "k", "v", "out")]
    names += [f"fusion_layers.{i}.attention.out_proj" for i in range(3)]
    assert sorted(lora_targets(model)) == sorted(names)


def test_gradients_reach_the_fusion_blocks_only_and_checkpointing_keeps_them(fixtures):
    torch.manual_seed(0)
    x, r = 0.1 * torch.randn(2, 8000), 0.1 * torch.randn(2, 8000)
    lengths = torch.tensor([8000, 6000])
    grads = []
    for checkpointing in (False, True):
        model = load("nabeats", fixtures / CKPT)
        model.fusion_layers.requires_grad_(True)
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        for block in model.fusion_layers:
            block.attention.dropout = 0.0  # the same numbers in both runs
        tokens, mask = model(x, lengths, reference=r, reference_lengths=lengths)
        tokens[~mask].pow(2).mean().backward()
        assert all(p.grad is None for p in model.base.parameters())
        grads.append([p.grad.clone() for p in model.fusion_layers.parameters()])
        assert all(g.abs().sum() > 0 for g in grads[-1][:4])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lora_trains_adapters_in_the_base_and_the_fusion():
    from kit.lora import add_lora

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = add_lora(load("nabeats", config="unit"), rank=2)
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert (
        "base.encoder.layers.0.self_attn.q_proj" in adapted
        and "fusion_layers.1.attention.out_proj" in adapted
    )
    x = 0.1 * torch.randn(1, 8000)
    tokens, _ = model(x, reference=x.flip(-1))
    tokens.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_random_init_is_beats_on_the_near_channel():
    """The release initialises every fusion block to the identity: untrained, NA-BEATs is its base."""
    with pytest.warns(UserWarning, match="NO PRETRAINED WEIGHTS"):
        model = load("nabeats", config="unit").eval()
    x = 0.1 * torch.randn(2, 9000)
    with torch.no_grad():
        tokens, _ = model(x, reference=0.1 * torch.randn(2, 7000))
        alone, _ = model.base(x)
    torch.testing.assert_close(tokens, alone, rtol=0, atol=1e-6)
    assert backbones.configs("nabeats") == ["cpu", "release", "unit"]
    with pytest.raises(ValueError, match="base= goes with a checkpoint"):
        load("nabeats", config="unit", base="BEATs_iter3.pt")
    release = nabeats.CONFIGS["release"]
    assert beats.CONFIGS[release[0]].encoder_layers == 12 and release[1] == nabeats.FusionConfig(
        8, 3, 1e-6, 0.1
    )


def test_the_pickle_cannot_run_code(fixtures, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "ran"),))

    raw = nabeats.read_lightning(fixtures / CKPT)
    raw["callbacks"] = {"x": Payload()}
    torch.save(raw, tmp_path / "evil.ckpt")
    with pytest.raises(
        CheckpointError, match=r"evil\.ckpt: refusing to load the global (posix|os|nt)\.mkdir"
    ):
        load("nabeats", tmp_path / "evil.ckpt", base=fixtures / "BEATs_iter3.pt")
    assert not (tmp_path / "ran").exists()


def _rewritten(fixtures, tmp_path, name, change) -> str:
    raw = nabeats.read_lightning(fixtures / CKPT)
    change(raw)
    torch.save(raw, tmp_path / name)
    return str(tmp_path / name)


def test_bad_checkpoints_are_refused_with_the_reason(fixtures, tmp_path):
    base = fixtures / "BEATs_iter3.pt"

    def no_fusion(raw):
        raw["state_dict"] = OrderedDict()

    def other_model(raw):
        raw["hyper_parameters"]["model_cfg"]["_target_"] = "nassl.model.NAEAT"

    def extra_weights(raw):
        raw["state_dict"]["model.encoder.beats.layer_norm.weight"] = torch.ones(64)

    cases = [
        (no_fusion, "no_fusion.ckpt", "holds no fusion layers"),
        (other_model, "naeat.ckpt", "builds nassl.model.NAEAT, not NA-BEATs"),
        (extra_weights, "extra.ckpt", "weights besides the fusion layers"),
    ]
    for change, name, message in cases:
        with pytest.raises(CheckpointError, match=f"{name}: .*{message}"):
            load("nabeats", _rewritten(fixtures, tmp_path, name, change), base=base)

    data = (fixtures / CKPT).read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "page.ckpt").write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: not a readable NA-BEATs checkpoint"):
        load("nabeats", tmp_path / "truncated.ckpt", base=base)
    with pytest.raises(CheckpointError, match=r"page\.ckpt is a text/HTML page"):
        load("nabeats", tmp_path / "page.ckpt", base=base)
    with pytest.raises(CheckpointError, match="this is a BEATs file.*pass it as base="):
        load("nabeats", base)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load("nabeats", tmp_path / "missing.ckpt")


def test_a_base_that_does_not_fit_is_refused(fixtures, tmp_path):
    small = beats.build("unit")  # 2 layers of width 32; the fusion layers are 3 of width 64
    torch.save({"cfg": small.cfg, "model": small.state_dict()}, tmp_path / "BEATs_small.pt")
    with pytest.raises(CheckpointError, match="BEATs with 2 layers of width 32.*3 fusion layers of width 64"):
        load("nabeats", fixtures / CKPT, base=tmp_path / "BEATs_small.pt")
    (tmp_path / "html.pt").write_text("<html>rate limited</html>")
    with pytest.raises(CheckpointError, match=r"html\.pt.*not a (readable torch|BEATs) checkpoint"):
        load("nabeats", fixtures / CKPT, base=tmp_path / "html.pt")


def test_the_base_is_found_beside_the_checkpoint_or_in_a_cache(fixtures, tmp_path, monkeypatch):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(fixtures / CKPT, lone / CKPT)
    cache = tmp_path / "nassl"
    monkeypatch.setattr(nabeats, "DEFAULT_CACHE", tmp_path / "kit-cache")
    monkeypatch.setattr(nabeats, "BASE_URL", "http://127.0.0.1:9/BEATs_iter3.pt")  # nothing listens there
    monkeypatch.setenv("NASSL_CACHE_DIR", str(cache))
    with pytest.raises(CheckpointError, match="the base BEATs_iter3.pt of .* is not beside it nor cached"):
        load("nabeats", lone / CKPT)
    cache.mkdir()
    shutil.copy(fixtures / "BEATs_iter3.pt", cache / "BEATs_iter3.pt")
    assert nabeats.base_file(lone / CKPT, None) == cache / "BEATs_iter3.pt"
    assert nabeats.base_file(fixtures / CKPT, None) == fixtures / "BEATs_iter3.pt"  # beside it first
    assert load("nabeats", lone / CKPT).pretrained


@pytest.fixture()
def release_site(fixtures, tmp_path, monkeypatch):
    """The fixture pair served as the release would be, the release URLs pointed at it."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(fixtures / CKPT, site / "dcase2026_nabeats_seed0.ckpt")
    shutil.copy(fixtures / "BEATs_iter3.pt", site / "BEATs_iter3.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(
        nabeats, "RELEASES", {k: v.replace(nabeats.RELEASE_URL, url) for k, v in nabeats.RELEASES.items()}
    )
    monkeypatch.setattr(nabeats, "BASE_URL", f"{url}/BEATs_iter3.pt")
    monkeypatch.setattr(nabeats, "DEFAULT_CACHE", tmp_path / "unused-cache")
    yield url
    server.shutdown()


def test_a_release_name_downloads_both_files_into_the_cache(release_site, fixtures, expected, tmp_path):
    model = load("nabeats", "dcase2026_nabeats_seed0", cache_dir=tmp_path / "cache").eval()
    for name, source in (("dcase2026_nabeats_seed0.ckpt", CKPT), ("BEATs_iter3.pt", "BEATs_iter3.pt")):
        assert (tmp_path / "cache" / "urls" / name).read_bytes() == (fixtures / source).read_bytes()
    _close(_run(model, expected["clip2/x"][None], expected["clip2/n_ref"][None])[0], expected["clip2/z"])


def test_release_names_and_an_unreachable_release(monkeypatch, tmp_path):
    assert nabeats.release_checkpoint("dcase2026_nabeats_seed2") == (
        "https://github.com/merlresearch/noise-aware-audio-ssl/releases/download/v1.0.0/dcase2026_nabeats_seed2.ckpt"
    )
    assert nabeats.BASE_URL.endswith("/v1.0.0/BEATs_iter3.pt")
    assert nabeats.release_checkpoint("runs/x.ckpt") == "runs/x.ckpt"
    monkeypatch.setattr(
        nabeats, "RELEASES", {"dcase2026_nabeats_seed0": "http://127.0.0.1:9/dcase2026_nabeats_seed0.ckpt"}
    )
    with pytest.raises(CheckpointError, match="cannot download checkpoint .*dcase2026_nabeats_seed0.ckpt"):
        load("nabeats", "dcase2026_nabeats_seed0", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# In the flow: extraction and training pass the far channel of the same clip as the reference
# --------------------------------------------------------------------------------------------------


def _stereo_dataset(root, seconds=(0.9, 1.2, 1.0, 1.3), mono=False):
    """Two attribute classes of one machine, clips of different lengths; far = a delayed, quieter
    near plus its own noise (so near and far differ everywhere)."""
    import soundfile as sf

    from kit import data

    rng = np.random.default_rng(0)
    folder = root / "dev_data" / "raw" / "fan" / "train"
    folder.mkdir(parents=True)
    for i, length in enumerate(seconds):
        t = np.arange(int(length * 16000)) / 16000
        near = 0.3 * np.sin(2 * np.pi * (300 + 600 * (i % 2)) * t) + 0.05 * rng.standard_normal(len(t))
        far = 0.4 * np.roll(near, 12) + 0.1 * rng.standard_normal(len(t))
        audio = near if mono else np.stack([near, far], 1)
        name = f"section_00_source_train_normal_{i:04d}_spd_{i % 2}.wav"
        sf.write(folder / name, audio.astype(np.float32), 16000, subtype="FLOAT")
    return data.build_index(root, progress=False)


@pytest.fixture(scope="module")
def stereo_index(tmp_path_factory):
    return _stereo_dataset(tmp_path_factory.mktemp("stereo"))


def _fused_embedder():
    """A small NA-BEATs whose fusion blocks are not the identity (so the reference matters), with the
    parameter-free statistics head."""
    from kit import heads

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load("nabeats", config="unit")
    with torch.no_grad():
        for p in model.fusion_layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return models.Embedder(model, heads.make_head("stats", model.embed_dim, None)).eval()


def _by_hand(embedder, waves, references):
    with torch.no_grad():
        return torch.cat(
            [embedder(w[None], torch.tensor([len(w)]), reference=r[None]) for w, r in zip(waves, references)]
        ).numpy()


def test_extraction_gives_every_channel_the_far_channel_as_reference(stereo_index):
    from kit import data, embed

    embedder = _fused_embedder()
    items, emb = embed.compute_embeddings(
        embedder, stereo_index, channels=("near", "w1", "far"), batch_size=3, num_workers=0, progress=False
    )
    pairs = [torch.from_numpy(data.load_audio(p, "both")) for p in stereo_index["path"]]
    far = [pair[1] for pair in pairs]
    for channel in ("near", "w1", "far"):
        waves = [torch.from_numpy(data.derive_channel(pair.numpy(), channel)) for pair in pairs]
        rows = (items["channel"] == channel).to_numpy()
        np.testing.assert_allclose(emb[rows], _by_hand(embedder, waves, far), rtol=0, atol=1e-4)
    near = [pair[0] for pair in pairs]
    assert np.abs(emb[: len(near)] - _by_hand(embedder, near, near)).max() > 1e-3  # the reference matters


def test_windowed_extraction_cuts_the_reference_alike(stereo_index):
    from kit import data, embed

    embedder = _fused_embedder()
    _, emb = embed.compute_embeddings(
        embedder,
        stereo_index,
        channels=("near",),
        window_seconds=0.5,
        window_hop=0.3,
        batch_size=2,
        num_workers=0,
        progress=False,
    )
    for row, path in enumerate(stereo_index["path"]):
        pair = torch.from_numpy(data.load_audio(path, "both"))
        starts = embed.window_starts(pair.shape[1], 8000, 4800)
        pieces = _by_hand(
            embedder, [pair[0, s : s + 8000] for s in starts], [pair[1, s : s + 8000] for s in starts]
        )
        np.testing.assert_allclose(emb[row], pieces.mean(0), rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_mono_data_is_refused_by_name(tmp_path):
    from kit import data, embed, train

    index = _stereo_dataset(tmp_path / "mono", seconds=(0.9, 1.0), mono=True)
    with pytest.raises(data.DatasetError, match=r"nabeats takes the far channel .*_0000_spd_0\.wav is mono"):
        embed.compute_embeddings(_fused_embedder(), index, channels=("near",), num_workers=0, progress=False)
    cfg = _train_cfg(channels=("near",))
    with pytest.raises(data.DatasetError, match=r"training clip .*\.wav is mono"):
        train.train(index, cfg, tmp_path / "run", progress=False)


def test_training_items_bring_the_far_channel_of_the_same_crop(stereo_index):
    from kit import data, train

    items = stereo_index.assign(channel="near")
    length = data.LengthPolicy(mode="random_crop", seconds=0.5)
    dataset = train.TrainItems(items, np.zeros(len(items), dtype=int), length, [], reference=True)
    for index in range(len(items)):
        for seed in (1, 2, 3):
            wave, valid, _, _, _, reference, reference_valid = dataset[(index, seed)]
            both, both_valid = data.read_clip(
                items["path"].iloc[index], "both", length, np.random.default_rng(seed)
            )
            np.testing.assert_array_equal(wave, both[0])
            np.testing.assert_array_equal(reference, both[1])
            assert valid == reference_valid == both_valid
    plain = train.TrainItems(items, np.zeros(len(items), dtype=int), length, [])
    assert len(plain[(0, 1)]) == 5  # no reference for a backbone that takes none


def _train_cfg(**kw):
    from kit import train

    values = dict(
        name="nab",
        backbone="nabeats",
        backbone_config="unit",
        mode="partial",
        train_last_n=2,
        head="asp",
        embed_dim=8,
        label_scheme="attribute",
        channels=("near", "w1"),
        train_datasets=("dev",),
        crop_seconds=0.5,
        steps=2,
        batch_size=2,
        warmup_steps=1,
        num_workers=0,
        mixup_alpha=0.5,
        spec_augment=True,
    )
    return train.TrainConfig.from_dict({**values, **kw})


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_fine_tuning_trains_the_fusion_blocks_with_the_reference(stereo_index, tmp_path):
    from kit import train

    cfg = _train_cfg()
    out = train.train(stereo_index, cfg, tmp_path, progress=False)
    saved = torch.load(out / "model.pt", weights_only=True)["state"]
    backbone_keys = [k for k in saved if k.startswith("backbone.")]
    assert backbone_keys and all(k.startswith("backbone.fusion_layers.") for k in backbone_keys)
    embedder = models.load_embedder(out)
    x = 0.1 * torch.randn(2, 9000)
    with torch.no_grad():
        assert embedder(x, torch.tensor([9000, 8000]), reference=x.flip(0)).shape == (2, 8)


def test_per_band_extraction_keeps_the_reference(stereo_index):
    """pooling='band_rdp' pools the grid tokens, which NA-BEATs computes with the far channel too."""
    from kit import data, embed, heads

    embedder = _fused_embedder()
    _, emb = embed.compute_embeddings(
        embedder, stereo_index, channels=("near",), pooling="band_rdp", num_workers=0, progress=False
    )
    pool = heads.BandPool("band_rdp", heads.RDP_GAMMA)
    for row, path in enumerate(stereo_index["path"]):
        pair = torch.from_numpy(data.load_audio(path, "both"))
        with torch.no_grad():
            grid, mask = embedder.backbone.grid_tokens(pair[:1], reference=pair[1:])
            np.testing.assert_allclose(emb[row], pool(grid, mask)[0].numpy(), rtol=0, atol=1e-4)
    assert emb.shape[1:] == (8, embedder.backbone.embed_dim)


@pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")
def test_full_mode_trains_the_fusion_blocks_and_lora_its_adapters():

    for mode, trained in (("full", "fusion_layers."), ("lora", "lora_")):
        embedder = models.build_embedder(_train_cfg(mode=mode, lora_rank=2))
        names = [n for n, p in embedder.backbone.named_parameters() if p.requires_grad]
        assert names and all(trained in n for n in names), mode


def test_the_speed_benchmark_has_a_nabeats_row():
    from kit.tools import bench, bench_train

    assert bench_train.release_configs("nabeats") == ["release"]  # BEATs_iter3 sizes + 12 fusion blocks
    row = bench.measure_speed("nabeats", batch=2, seconds=1.0, repeats=1, device="cpu", config="unit")
    assert row["backbone"] == "nabeats" and row["clips_per_s"] > 0 and row["max_abs_diff"] < 1e-4
    extraction = bench.measure_extraction(
        "nabeats", batch=1, seconds=1.0, repeats=1, device="cpu", config="unit"
    )
    assert extraction["extract_clips_per_s"] > 0
