"""The from-scratch CNN backbone: factory, shapes, batch invariance, bad input, learning, weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from kit import backbones, data, heads, losses, models, train
from kit.backbones import cnn
from kit.lora import add_lora

SR = 16000


def _unit(seed: int = 0) -> cnn.Cnn:
    torch.manual_seed(seed)
    return backbones.load("cnn", config="unit")


def _random_batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for row, n in zip(waves, lengths):
        row[:n] = 0.1 * torch.randn(n, generator=gen)
    return waves, torch.tensor(lengths)


def test_registered_and_built_without_the_no_pretrained_warning():
    assert "cnn" in backbones.BACKBONES
    assert {"cpu", "unit", "wide"} <= set(backbones.configs("cnn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        model = backbones.load("cnn")
    assert isinstance(model, cnn.Cnn) and model.pretrained is False and model.trains_from_scratch
    assert model.config == cnn.CONFIGS[cnn.DEFAULT_CONFIG]
    with pytest.raises(ValueError, match="unknown cnn config 'huge'"):
        backbones.load("cnn", config="huge")
    with pytest.raises(ValueError, match=r"unknown cnn option\(s\) \['depth'\]"):
        backbones.load("cnn", config="unit", depth=3)


def test_token_shapes_and_counts():
    model = _unit().eval()
    config = model.config
    lengths = [model.min_samples, 4000, 9000]
    tokens, padding = model(*_random_batch(lengths))
    frames = [(n - config.n_fft) // config.hop_length + 1 for n in lengths]
    expected = [f // 2 // 2 for f in frames]  # two stages, each halving time
    assert (
        tokens.shape
        == (3, max(expected), config.token_dim + config.spectrum_dim)
        == (3, max(expected), model.embed_dim)
    )
    assert (~padding).sum(1).tolist() == expected
    assert torch.all(tokens[padding] == 0)
    features, n_frames = model.frontend(*_random_batch(lengths))
    assert features.shape == (3, max(frames), config.n_mels) and n_frames.tolist() == frames


@pytest.mark.parametrize("config", ["unit", "cpu_nospectrum"])
def test_a_clip_gives_the_same_tokens_alone_as_in_a_padded_batch(config):
    torch.manual_seed(1)
    model = backbones.load("cnn", config=config)
    # Fresh BatchNorms are the identity at eval: give them statistics so the test can fail.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    model.eval()
    lengths = [model.min_samples + 1500, model.min_samples, model.min_samples + 7777]
    waves, lens = _random_batch(lengths, seed=2)
    waves[0, lengths[0] :] = 5.0  # whatever the padding holds
    tokens, padding = model(waves, lens)
    for i, n in enumerate(lengths):
        alone, alone_padding = model(waves[i : i + 1, :n], lens[i : i + 1])
        assert not alone_padding.any()
        torch.testing.assert_close(tokens[i, ~padding[i]], alone[0], atol=1e-5, rtol=1e-4)


def test_bad_input_gives_clear_errors():
    model = _unit().eval()
    with pytest.raises(ValueError, match=r"shape \[batch, samples\]"):
        model(torch.zeros(8000))
    with pytest.raises(ValueError, match="shape \\[batch, samples\\]"):
        model(torch.zeros(2, 8000, dtype=torch.int16))
    waves = torch.zeros(2, 8000)
    waves[1, 10] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite samples \(clips \[1\]"):
        model(waves)
    with pytest.raises(ValueError, match=r"clips \[1\] of the batch are shorter than 640 samples"):
        model(torch.zeros(2, 8000), torch.tensor([8000, 639]))
    with pytest.raises(ValueError, match="exceed the 8000 samples"):
        model(torch.zeros(2, 8000), torch.tensor([8000, 8001]))
    with pytest.raises(ValueError, match=r"lengths must have shape \[2\]"):
        model(torch.zeros(2, 8000), torch.tensor([8000]))
    with pytest.raises(ValueError, match="halve the 8 mel bands to nothing"):
        cnn.build("unit", n_mels=8, channels=(4, 4, 4, 4))


def test_input_norm_takes_training_statistics_from_valid_frames_only():
    norm = cnn.MaskedBandNorm(2, momentum=1.0).train()
    x = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [0.0, 0.0]], [[5.0, 50.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = norm(x, valid)
    torch.testing.assert_close(norm.running_mean, torch.tensor([3.0, 30.0]))
    torch.testing.assert_close(norm.running_var, torch.tensor([4.0, 400.0]))  # unbiased over 3 frames
    std = torch.tensor([(8 / 3) ** 0.5, (800 / 3) ** 0.5])
    torch.testing.assert_close(out[0, 0], (x[0, 0] - torch.tensor([3.0, 30.0])) / torch.sqrt(std**2 + 1e-5))


def _tones(n_per_class=8, seconds=0.5, seed=0):
    """Two classes: a 400 Hz and a 2500 Hz tone in noise, random phase and level."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    waves, labels = [], []
    for label, f0 in enumerate((400.0, 2500.0)):
        for _ in range(n_per_class):
            tone = rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
            waves.append(tone + 0.02 * rng.standard_normal(len(t)))
            labels.append(label)
    return torch.tensor(np.stack(waves), dtype=torch.float32), torch.tensor(labels)


def test_loss_falls_and_classes_separate_on_a_tiny_task():
    torch.manual_seed(0)
    model = backbones.load("cnn", config="unit")
    head = heads.make_head("mean", model.embed_dim, 8)
    loss_fn = losses.make_loss("arcface", 8, 2, s=16.0, m=0.2)
    params = [*model.parameters(), *head.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    waves, labels = _tones()
    history = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(head(*model(waves)), labels)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert np.mean(history[-5:]) < 0.3 * np.mean(history[:5])
    model.eval()
    unseen, unseen_labels = _tones(seed=1)
    with torch.no_grad():
        predicted = loss_fn.logits(head(*model(unseen))).argmax(1)
    assert (predicted == unseen_labels).float().mean() == 1.0


@pytest.fixture(scope="module")
def tone_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn_tones")
    waves, labels = _tones(n_per_class=4, seconds=1.0)
    folder = root / "dev_data" / "raw" / "toy" / "train"
    folder.mkdir(parents=True)
    for i, (wave, label) in enumerate(zip(waves.numpy(), labels.tolist())):
        name = f"section_00_source_train_normal_{i:04d}_f_{label}.wav"
        sf.write(folder / name, wave, SR, subtype="FLOAT")
    return data.build_index(root, progress=False)


def test_trains_through_kit_train_and_reloads_from_its_model_pt(tone_index, tmp_path):
    cfg = train.TrainConfig.from_dict(
        dict(
            name="cnn",
            backbone="cnn",
            backbone_config="unit",
            head="mean",
            embed_dim=8,
            loss="arcface",
            loss_s=16.0,
            loss_m=0.2,
            label_scheme="attribute",
            channels=("near",),
            train_datasets=("dev",),
            crop_seconds=0.5,
            steps=6,
            batch_size=4,
            warmup_steps=2,
        )
    )
    folder = train.train(tone_index, cfg, tmp_path, progress=False)
    embedder = models.load_embedder(folder)
    assert isinstance(embedder.backbone, cnn.Cnn)
    backbone = backbones.load("cnn", folder)  # the backbone part of model.pt, through the factory
    waves, lengths = _random_batch([4000, 3000], seed=3)
    with torch.no_grad():
        for a, b in zip(backbone.eval()(waves, lengths), embedder.backbone(waves, lengths)):
            torch.testing.assert_close(a, b)


def test_save_and_from_checkpoint_round_trip_and_refuse_foreign_files(tmp_path):
    model = _unit(seed=4)
    with torch.no_grad():
        model.input_norm.running_mean.fill_(0.5)
    path = cnn.save(model, tmp_path / "cnn.pt")
    loaded = cnn.from_checkpoint(path)
    assert loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(FileNotFoundError, match="cnn checkpoint not found"):
        cnn.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(backbones.CheckpointError, match="cannot read cnn checkpoint"):
        cnn.from_checkpoint(tmp_path / "junk.pt")
    torch.save({"config": {"backbone": "beats"}, "state": {}}, tmp_path / "beats_model.pt")
    with pytest.raises(backbones.CheckpointError, match="backbone 'beats', not cnn"):
        cnn.from_checkpoint(tmp_path / "beats_model.pt")
    state = dict(model.state_dict())
    state.pop("token_projection.bias")
    torch.save(
        {"backbone": "cnn", "config": cnn.dataclasses.asdict(model.config), "state": state},
        tmp_path / "cut.pt",
    )
    with pytest.raises(backbones.CheckpointError, match=r"missing \['token_projection.bias'\]"):
        cnn.from_checkpoint(tmp_path / "cut.pt")


def test_partial_lora_and_checkpointing_hooks():
    model = _unit()
    assert len(model.blocks) == len(model.config.channels)
    assert backbones.lora_targets(model) == [f"blocks.{i}.conv{j}" for i in range(2) for j in (1, 2)]
    with pytest.warns(UserWarning, match="gradient checkpointing is not implemented"):
        model.set_gradient_checkpointing(True)
    add_lora(model, rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tokens, _ = model.train()(*_random_batch([4000, 4000]))
    tokens.sum().backward()


def test_spec_augment_hook_runs_in_training_mode_only():
    model = _unit()
    calls = []
    augment = lambda feats, n: calls.append(feats.shape) or torch.zeros_like(feats)
    waves, lengths = _random_batch([4000, 3000])
    model.eval()(waves, lengths, augment=augment)
    assert calls == []
    model.train()(waves, lengths, augment=augment)
    assert calls and calls[0][-1] == model.config.n_mels


def test_a_silent_clip_gives_finite_tokens():
    model = _unit().eval()  # log of the power floor everywhere, in both branches
    tokens, _ = model(torch.zeros(1, 5000))
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("config", ["unit", "cpu_nospectrum"])
def test_grid_tokens_are_the_map_the_tokens_project_and_batch_invariant(config):
    torch.manual_seed(1)
    model = backbones.load("cnn", config=config)
    with torch.no_grad():  # fresh BatchNorms are the identity at eval: give them statistics
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    model.eval()
    assert model.has_grid
    lengths = [model.min_samples + 7777, model.min_samples, model.min_samples + 1500]
    waves, lens = _random_batch(lengths, seed=2)
    waves[1, lengths[1] :] = 5.0  # whatever the padding holds
    with torch.no_grad():
        tokens, padding = model(waves, lens)
        grid, grid_padding = model.grid_tokens(waves, lens)
    cfg = model.config
    assert grid.shape == (3, tokens.shape[1], cfg.n_mels >> len(cfg.channels), cfg.channels[-1])
    assert torch.equal(grid_padding, padding) and torch.all(grid[grid_padding] == 0)
    # forward's spectrogram tokens are the projection of each step's [C x F'] map (channel-major)
    projected = model.token_projection(grid.permute(0, 1, 3, 2).flatten(2))
    valid = ~padding
    torch.testing.assert_close(projected[valid], tokens[valid][:, : cfg.token_dim])
    for i, n in enumerate(lengths):
        alone, alone_padding = model.grid_tokens(waves[i : i + 1, :n], lens[i : i + 1])
        assert not alone_padding.any()
        torch.testing.assert_close(grid[i, valid[i]], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="takes no reference input"):
        model.grid_tokens(waves, lens, reference=waves)
