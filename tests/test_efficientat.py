"""EfficientAT MobileNetV3: the authors' outputs on the released mn04 checkpoint, exact padding, release
names, bad checkpoints, fine-tuning modes, the frozen branch and notebook 05 end to end."""

from __future__ import annotations

import functools
import http.server
import math
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kit import backbones, embed, heads, losses, manifest, models, pipeline, synth, train
from kit.backbones import CheckpointError, efficientat

ATOL = 1e-4
RELEASE = "mn04_as_mAP_432.pt"


@pytest.fixture(scope="module")
def release_file(backbone_fixtures):
    return backbone_fixtures / "efficientat" / RELEASE


@pytest.fixture(scope="module")
def expected(backbone_fixtures):
    return dict(np.load(backbone_fixtures / "efficientat" / "mn04_expected.npz"))


@pytest.fixture(scope="module")
def model(release_file):
    return backbones.load("efficientat", release_file).eval()


def _close(actual: torch.Tensor, reference: np.ndarray, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, torch.from_numpy(reference), rtol=0, atol=atol)


def _wave(expected, clip: str) -> torch.Tensor:
    return torch.from_numpy(expected[f"{clip}_wave16"])


def _padded(expected, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips a (10 s) and b (3.3 s) in one batch; b's padding holds ``fill``."""
    a, b = _wave(expected, "a")[0], _wave(expected, "b")[0]
    waves = torch.full((2, len(a)), fill)
    waves[0], waves[1, : len(b)] = a, b
    return waves, torch.tensor([len(a), len(b)])


def _mel_frames(samples: int) -> int:
    return 1 + (2 * samples - 1) // efficientat.HOP


# ----------------------------------------------------------------------------------------------
# Registration, configurations, the release table


def test_registered_with_a_config_per_width_and_the_release_table_in_step():
    assert "efficientat" in backbones.BACKBONES
    assert backbones.configs("efficientat") == ["mn04", "mn05", "mn10", "mn20", "mn30", "mn40"]
    with pytest.warns(UserWarning, match="NO PRETRAINED WEIGHTS"):
        model = backbones.load("efficientat")
    assert model.config == efficientat.CONFIGS[efficientat.DEFAULT_CONFIG] and model.pretrained is False
    assert model.has_grid and not model.takes_reference and model.embed_dim == 384
    for name, release in efficientat.RELEASES.items():
        built = efficientat.build(release["config"])
        assert built.config.width == release["width"] and release["file"].startswith(name + "_mAP_")
        assert sum(p.numel() for p in built.parameters()) == release["parameters"], name
    # the README's figures of the mn04 release: 312 tensors, 993,485 numbers, 4,066,513 bytes
    state = efficientat.build("mn04").state_dict()
    assert len(state) == 312 and sum(t.numel() for t in state.values()) == 993_485
    assert efficientat.RELEASES["mn04_as"]["bytes"] == 4_066_513
    with pytest.raises(ValueError, match="unknown efficientat config 'mn07'"):
        backbones.load("efficientat", config="mn07")
    with pytest.raises(ValueError, match=r"unknown efficientat option\(s\) \['depth'\]"):
        efficientat.build("mn04", depth=3)


# ----------------------------------------------------------------------------------------------
# The authors' outputs


@pytest.mark.parametrize("clip", ["a", "b"])
def test_frontend_matches_the_authors_mel(model, expected, clip):
    mel, frames = model.frontend(_wave(expected, clip))
    reference = expected[f"{clip}_mel"]  # [1, 128, frames]
    assert frames.tolist() == [reference.shape[2]] == [_mel_frames(_wave(expected, clip).shape[1])]
    _close(mel.transpose(1, 2), reference)


@pytest.mark.parametrize("clip", ["a", "b"])
def test_feature_map_embedding_and_logits_match_the_authors(model, expected, clip):
    wave = _wave(expected, clip)
    with torch.no_grad():
        fmap, valid = model.feature_map(wave)
        tokens, padding = model(wave)
        logits = model.audioset_logits(wave)
    _close(fmap, expected[f"{clip}_fmap_last"])
    assert valid.all() and not padding.any() and tokens.shape == (1, fmap.shape[3], 384)
    _close(tokens.mean(dim=1), expected[f"{clip}_embedding"])  # the mean of the tokens is the embedding
    _close(model.embedding(wave), expected[f"{clip}_embedding"])
    _close(logits, expected[f"{clip}_logits"])
    if clip == "a":
        assert logits[0].topk(3).indices.tolist() == [520, 521, 500]


# ----------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("fill", [0.0, 0.7])
def test_a_padded_batch_gives_each_clip_its_own_tokens(model, expected, fill):
    """Measured: the valid tokens of b padded to 10 s differ from b alone by ~3e-6 (float rounding)."""
    waves, lengths = _padded(expected, fill)
    with torch.no_grad():
        tokens, padding = model(waves, lengths)
        alone, _ = model(_wave(expected, "b"))
        logits = model.audioset_logits(waves, lengths)
    n_b = expected["b_fmap_last"].shape[3]
    assert padding.tolist() == [[False] * 32, [False] * n_b + [True] * (32 - n_b)]
    torch.testing.assert_close(tokens[1, :n_b], alone[0], rtol=0, atol=2e-5)
    assert torch.all(tokens[1, n_b:] == 0)
    _close(tokens[0].mean(0), expected["a_embedding"][0])
    _close(tokens[1, :n_b].mean(0), expected["b_embedding"][0])
    _close(logits, np.concatenate([expected["a_logits"], expected["b_logits"]]))


def test_grid_tokens_are_the_last_feature_map_per_band(model, expected):
    waves, lengths = _padded(expected, fill=0.3)
    with torch.no_grad():
        grid, grid_padding = model.grid_tokens(waves, lengths)
        tokens, padding = model(waves, lengths)
    assert grid.shape == (2, 32, 4, 384) and torch.equal(grid_padding, padding)
    torch.testing.assert_close(grid.mean(dim=2), tokens, rtol=0, atol=1e-6)
    n_b = expected["b_fmap_last"].shape[3]
    _close(grid[1, :n_b].permute(2, 1, 0)[None], expected["b_fmap_last"])  # [1, C, F, T]


def test_token_counts_follow_the_stride_32_positions_inside_the_clip():
    torch.manual_seed(0)
    model = efficientat.build("mn04").eval()
    lengths = [efficientat.MIN_SAMPLES, 2559, 2560, 2561, 5200, 16000]
    gen = torch.Generator().manual_seed(1)
    waves = 0.1 * torch.randn(len(lengths), max(lengths), generator=gen)
    with torch.no_grad():
        tokens, padding = model(waves, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            alone, alone_padding = model(waves[i : i + 1, :n])
            steps = math.ceil(_mel_frames(n) / efficientat.STRIDE)  # positions 32 j inside the frames
            assert (~padding[i]).sum() == steps == alone.shape[1] and not alone_padding.any()
            torch.testing.assert_close(tokens[i, :steps], alone[0], rtol=0, atol=2e-5)


def test_each_clip_reflects_its_own_end():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=gen)
    own = torch.tensor([40, 17, 9])
    padded = efficientat._reflect_pad_each(x, own, 8)
    for i, n in enumerate(own.tolist()):
        alone = F.pad(x[i : i + 1, :n], (8, 8), mode="reflect")[0]
        assert torch.equal(padded[i, : n + 16], alone)


def test_squeeze_excitation_averages_valid_steps_only():
    torch.manual_seed(0)
    layer = efficientat.SqueezeExcitation(8, 8)
    x = torch.randn(2, 8, 3, 6)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = layer(x, valid)
    torch.testing.assert_close(out[1, :, :, :4], layer(x[1:, :, :, :4])[0])
    torch.testing.assert_close(out[0], layer(x[:1])[0])


def test_too_short_and_bad_input_are_named(model):
    short = efficientat.MIN_SAMPLES - 1
    with pytest.raises(ValueError, match=f"clips \\[1\\] of the batch are shorter than {short + 1} samples"):
        model(torch.zeros(2, 4000), torch.tensor([4000, short]))
    with pytest.raises(ValueError, match=r"float waves of shape \[batch, samples\]"):
        model(torch.zeros(4000))
    with pytest.raises(ValueError, match="efficientat takes no reference input"):
        model(torch.zeros(1, 4000), reference=torch.zeros(1, 4000))
    with pytest.raises(ValueError, match="efficientat takes no reference input"):
        model.grid_tokens(torch.zeros(1, 4000), reference=torch.zeros(1, 4000))


# ----------------------------------------------------------------------------------------------
# Checkpoints: bad files, release names, downloads


def test_checkpoints_of_other_kinds_are_refused_naming_the_file(backbone_fixtures, release_file, tmp_path):
    beats = backbone_fixtures / "beats_release.pt"
    with pytest.raises(
        CheckpointError, match=f"{beats}: not an EfficientAT MobileNet release.*'cfg', 'model'"
    ):
        backbones.load("efficientat", beats)
    truncated = tmp_path / "mn04_truncated.pt"
    truncated.write_bytes(release_file.read_bytes()[:2_000_000])
    with pytest.raises(CheckpointError, match=f"cannot read EfficientAT checkpoint {truncated}.*truncated"):
        backbones.load("efficientat", truncated)
    state = torch.load(release_file, weights_only=True)
    odd = dict(state, **{"features.16.0.weight": torch.zeros(100, 64, 1, 1)})
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(
        CheckpointError, match=r"odd.pt: features.16.0.weight has 100 output channels.*384 \(mn04\)"
    ):
        backbones.load("efficientat", tmp_path / "odd.pt")
    missing = {k: v for k, v in state.items() if k != "features.3.block.1.0.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: .*missing \['features.3.block.1.0.weight'\]"):
        backbones.load("efficientat", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="efficientat takes no loading options"):
        backbones.load("efficientat", release_file, target_length=10)


@pytest.fixture()
def served(tmp_path, release_file):
    """The mn04 release file behind a local HTTP server, under its release file name."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(release_file, site / RELEASE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_a_release_name_is_downloaded_once_into_the_cache(served, tmp_path, release_file, monkeypatch):
    assert efficientat.RELEASE_URL == "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"
    monkeypatch.setattr(efficientat, "RELEASE_URL", served)
    model = backbones.load("efficientat", "mn04_as", cache_dir=tmp_path / "cache")
    cached = tmp_path / "cache" / "urls" / RELEASE
    assert model.pretrained and cached.read_bytes() == release_file.read_bytes()
    monkeypatch.setattr(efficientat, "RELEASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    again = backbones.load("efficientat", "mn04_as", cache_dir=tmp_path / "cache")  # from the cache
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_release_names_and_offline_downloads_are_explained(tmp_path, monkeypatch):
    with pytest.raises(
        CheckpointError, match="unknown EfficientAT release 'mn07_as'.*mn04_as, mn05_as, mn10_as"
    ):
        backbones.load("efficientat", "mn07_as", cache_dir=tmp_path)
    monkeypatch.setattr(efficientat, "RELEASE_URL", "http://127.0.0.1:9/")
    with pytest.raises(
        CheckpointError, match=r"cannot download checkpoint http://127.0.0.1:9/mn10_as_mAP_471.pt \(offline"
    ):
        backbones.load("efficientat", "mn10_as", cache_dir=tmp_path)
    assert efficientat.release_checkpoint("runs/x/model.pt") == "runs/x/model.pt"  # paths pass through


# ----------------------------------------------------------------------------------------------
# Fine-tuning


def test_batchnorm_statistics_stay_frozen_while_the_weights_train(release_file):
    model = backbones.load("efficientat", release_file)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    task = train.ProxyTask(
        models.Embedder(model, heads.make_head("mean", 384, 8)), losses.make_loss("arcface", 8, 2)
    )
    task.train()
    assert model.training and all(not m.training for m in norms)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    waves, lengths = 0.1 * torch.randn(3, 8000), torch.tensor([8000, 6000, 5000])
    loss, _ = task(waves, lengths, torch.tensor([0, 1, 0]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert norms[3].weight.grad is not None and not torch.equal(
        norms[3].weight, torch.ones_like(norms[3].weight)
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = efficientat.build("mn04").train()
    waves, lengths = 0.1 * torch.randn(2, 6000), torch.tensor([6000, 4000])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(flag)
        tokens, padding = model(waves, lengths)
        tokens[~padding].square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.blocks.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_fine_tuning_modes(release_file):
    def embedder(**settings):
        cfg = train.TrainConfig(backbone="efficientat", checkpoint=str(release_file), **settings)
        return models.build_embedder(cfg)

    partial = embedder(mode="partial", train_last_n=2)
    backbone = partial.backbone
    assert len(backbone.blocks) == 15 and backbone.blocks[-1] is backbone.features[15]
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {
        f"features.{i}.{n}" for i in (14, 15) for n, _ in backbone.features[i].named_parameters()
    }
    frozen = embedder(mode="frozen")
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())
    with pytest.raises(
        ValueError, match="efficientat is a CNN: LoRA targets attention projections; use full or partial"
    ):
        embedder(mode="lora")


def test_loss_falls_on_a_tiny_task(release_file):
    """Fine-tuning through the masks: two tones told apart from the pretrained start in a few steps."""
    torch.manual_seed(0)
    model = backbones.load("efficientat", release_file)
    head = heads.make_head("mean", model.embed_dim, 8)
    loss_fn = losses.make_loss("arcface", 8, 2, s=16.0, m=0.2)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters(), *loss_fn.parameters()], lr=1e-3)
    t = torch.arange(8000) / 16000
    rng = np.random.default_rng(0)
    waves = torch.stack(
        [0.2 * torch.sin(2 * math.pi * f0 * t + rng.uniform(0, 6)) for f0 in [300.0] * 4 + [2000.0] * 4]
    )
    lengths = torch.tensor([8000, 6000, 7000, 5000] * 2)
    labels = torch.tensor([0] * 4 + [1] * 4)
    history = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(head(*model(waves, lengths)), labels)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert np.mean(history[-3:]) < 0.5 * np.mean(history[:3])


def test_pretrained_embedder_pools_the_frozen_tokens(release_file, expected):
    waves, lengths = _padded(expected, fill=0.5)
    stats = models.pretrained_embedder("efficientat", release_file)
    mean = models.pretrained_embedder("efficientat", release_file, head="mean")
    assert models.count_parameters(stats) == models.count_parameters(stats.backbone)  # the head has none
    assert not any(p.requires_grad for p in stats.parameters()) and not stats.training
    with torch.no_grad():
        pooled, averaged = stats(waves, lengths), mean(waves, lengths)
    assert pooled.shape == (2, 768) and averaged.shape == (2, 384)
    _close(averaged, np.concatenate([expected["a_embedding"], expected["b_embedding"]]))
    torch.testing.assert_close(pooled[:, :384], averaged)
    with pytest.raises(ValueError, match="head must be 'stats' or 'mean'"):
        models.pretrained_embedder("efficientat", release_file, head="asp")


# ----------------------------------------------------------------------------------------------
# Notebook 05 under papermill


@pytest.mark.filterwarnings("ignore")
def test_notebook_05_fine_tunes_and_embeds_frozen(release_file, tmp_path):
    root = tmp_path / "data"
    synth.generate(root, scale=0.1, seed=0, machines=["SynValve", "SynBlower"], progress=False)
    common = {"checkpoint": str(release_file), "extraction": {"channels": ["near"]}}
    tiny = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "crop_seconds": 2.0, "num_workers": 0}
    recipe = {
        "steps": [
            {"notebook": "01_data_preparation"},
            {"notebook": "05_finetune_efficientat", "params": {**common, "name": "eat_ft", "training": tiny}},
            {
                "notebook": "05_finetune_efficientat",
                "params": {**common, "name": "eat_frozen", "finetune": False, "band_pooling": "band_mean"},
            },
        ]
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_dir = pipeline.run_recipe(str(tmp_path / "tiny.yaml"), str(root), tmp_path / "run")
    run = manifest.read(run_dir)
    tuned, frozen = run["branches"]["eat_ft"], run["branches"]["eat_frozen"]
    assert train.TrainConfig.from_dict(tuned["training"]).steps == 2
    assert frozen["training"] == {"checkpoint": str(release_file), "finetune": False, "head": "stats"}
    assert frozen["model_dir"] is None and frozen["parameters"] == tuned["parameters"] - (
        models.count_parameters(models.load_embedder(run_dir / "eat_ft").head)
    )
    _, tuned_emb = embed.load(manifest.embedding_folder(run_dir, "eat_ft"))
    items, frozen_emb = embed.load(manifest.embedding_folder(run_dir, "eat_frozen"))
    assert tuned_emb.shape[1] == 128 and frozen_emb.shape == (len(items), 768) and len(items) == 36
    _, bands = embed.load(manifest.embedding_folder(run_dir, "eat_frozen_bmean"))  # grid tokens per band
    assert bands.shape == (36, 4, 384) and run["branches"]["eat_frozen_bmean"]["band_of"] == "eat_frozen"
    assert (run_dir / "notebooks" / "05_finetune_efficientat-eat_frozen.ipynb").exists()
