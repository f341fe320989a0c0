"""BEATs reproduces the official implementation's outputs on official-format checkpoints, is exact
under padding, and refuses checkpoints it cannot load with a message that says why."""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch

from kit.backbones import CheckpointError, beats, load, lora_targets

ATOL = 1e-4
VARIANTS = ("beats_release", "beats_variant")


@pytest.fixture(scope="module")
def audio_pair(audio):
    return audio["a"], audio["b"]


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request, backbone_fixtures):
    """(loaded model in eval mode, expected outputs, checkpoint path) for each fixture checkpoint."""
    path = backbone_fixtures / f"{request.param}.pt"
    expected = dict(np.load(backbone_fixtures / f"{request.param}_expected.npz"))
    return load("beats", path).eval(), expected, path


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    torch.testing.assert_close(actual, torch.from_numpy(expected), rtol=0, atol=ATOL)


def _padded(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    waves = torch.zeros(2, len(a))
    waves[0], waves[1, : len(b)] = a, b
    return waves, torch.tensor([len(a), len(b)])


def test_fbank_matches_reference(checkpoint, audio_pair):
    model, expected, _ = checkpoint
    for name, wave in zip("ab", audio_pair):
        fbank, n_frames = model.frontend(wave[None])
        assert n_frames.tolist() == [expected[f"{name}_fbank"].shape[1]]
        _close(fbank, expected[f"{name}_fbank"])


def test_features_match_reference(checkpoint, audio_pair):
    model, expected, _ = checkpoint
    with torch.no_grad():
        for name, wave in zip("ab", audio_pair):
            tokens, padding_mask = model(wave[None], torch.tensor([len(wave)]))
            _close(tokens, expected[f"{name}_features"])
            assert not padding_mask.any()


def test_padded_batch_gives_each_clip_its_own_tokens(checkpoint, audio_pair):
    model, expected, _ = checkpoint
    with torch.no_grad():
        tokens, padding_mask = model(*_padded(*audio_pair))
    n_a, n_b = expected["a_features"].shape[1], expected["b_features"].shape[1]
    assert tokens.shape == (2, n_a, model.embed_dim)
    _close(tokens[:1], expected["a_features"])
    _close(tokens[1:, :n_b], expected["b_features"])  # the official batch output differs here
    assert padding_mask.tolist() == [[False] * n_a, [False] * n_b + [True] * (n_a - n_b)]
    assert torch.all(tokens[1, n_b:] == 0)


def test_predictor_probabilities(backbone_fixtures, audio_pair):
    path = backbone_fixtures / "beats_variant.pt"
    expected = np.load(backbone_fixtures / "beats_variant_expected.npz")["a_predictor_probs"]
    model = load("beats", path).eval()
    a, b = audio_pair
    with torch.no_grad():
        _close(model.predict(a[None]), expected)
        probs = model.predict(*_padded(a, b))
    _close(probs[:1], expected)
    with torch.no_grad():
        alone = model.predict(b[None])
    torch.testing.assert_close(probs[1:], alone, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="no predictor"):
        load("beats", backbone_fixtures / "beats_release.pt").predict(a[None])


def test_loaded_model_answers_the_interface(checkpoint):
    model, expected, path = checkpoint
    assert model.pretrained and model.name == "beats"
    assert model.embed_dim == expected["a_features"].shape[-1]
    cfg = torch.load(path, weights_only=True)["cfg"]
    assert len(model.blocks) == cfg["encoder_layers"] and model.blocks is model.encoder.layers
    assert model.cfg["deep_norm"] == cfg["deep_norm"] and model.cfg["gru_rel_pos"] == cfg["gru_rel_pos"]
    names = [f"encoder.layers.{i}.self_attn.{p}_proj" for i in range(len(model.blocks)) for p in "kvq"]
    names += [f"encoder.layers.{i}.self_attn.out_proj" for i in range(len(model.blocks))]
    assert sorted(lora_targets(model)) == sorted(names)


def test_eval_mode_is_deterministic(checkpoint, audio_pair):
    model, _, _ = checkpoint
    with torch.no_grad():
        first, _ = model(*_padded(*audio_pair))
        second, _ = model(*_padded(*audio_pair))
    assert torch.equal(first, second)


def _payload(path) -> dict:
    return torch.load(path, weights_only=True)


def test_bias_table_stored_only_in_layer_0_loads(backbone_fixtures, audio_pair, tmp_path):
    payload = _payload(backbone_fixtures / "beats_release.pt")
    copies = [k for k in payload["model"] if "relative_attention_bias" in k and ".layers.0." not in k]
    assert copies  # the official state dict repeats the shared table under every layer
    for key in copies:
        del payload["model"][key]
    torch.save(payload, tmp_path / "layer0_only.pt")
    model = load("beats", tmp_path / "layer0_only.pt").eval()
    expected = np.load(backbone_fixtures / "beats_release_expected.npz")["a_features"]
    with torch.no_grad():
        _close(model(audio_pair[0][None])[0], expected)


def test_differing_bias_table_copies_are_refused(backbone_fixtures, tmp_path):
    payload = _payload(backbone_fixtures / "beats_release.pt")
    key = "encoder.layers.2.self_attn.relative_attention_bias.weight"
    payload["model"][key] = payload["model"][key] + 1.0  # a new tensor: the copies share storage
    torch.save(payload, tmp_path / "bad_copy.pt")
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load("beats", tmp_path / "bad_copy.pt")


def test_corrupt_and_foreign_files_are_refused(backbone_fixtures, tmp_path):
    data = (backbone_fixtures / "beats_release.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save(_payload(backbone_fixtures / "beats_release.pt")["model"], tmp_path / "bare_state.pt")
    for name in ("truncated.pt", "text.pt"):
        with pytest.raises(CheckpointError, match=f"{name}: not a readable torch checkpoint"):
            load("beats", tmp_path / name)
    for name in ("list.pt", "bare_state.pt"):
        with pytest.raises(CheckpointError, match="expected a dict with 'cfg' and 'model'"):
            load("beats", tmp_path / name)
    with pytest.raises(CheckpointError, match="EAT or FISHER"):
        load("beats", backbone_fixtures / "eat_fairseq.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        beats.from_checkpoint(tmp_path / "missing.pt")


def test_missing_and_unexpected_keys_are_named(backbone_fixtures, tmp_path):
    payload = _payload(backbone_fixtures / "beats_release.pt")
    del payload["model"]["encoder.layers.1.fc2.bias"]
    payload["model"]["encoder.layers.1.adapter.weight"] = torch.zeros(3)
    torch.save(payload, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError) as caught:
        load("beats", tmp_path / "keys.pt")
    message = str(caught.value)
    assert re.search(r"missing \['encoder\.layers\.1\.fc2\.bias'\]", message)
    assert re.search(r"unexpected \['encoder\.layers\.1\.adapter\.weight'\]", message)


def test_wrong_shape_names_key_and_shapes(backbone_fixtures, tmp_path):
    payload = _payload(backbone_fixtures / "beats_release.pt")
    payload["model"]["encoder.layers.0.fc1.weight"] = torch.zeros(191, 96)
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.fc1\.weight .*\(191, 96\).*\(192, 96\)"):
        load("beats", tmp_path / "shape.pt")


def test_checkpoint_options_override_training_fields_only(backbone_fixtures):
    path = backbone_fixtures / "beats_release.pt"
    model = load("beats", path, encoder_layerdrop=0.0, dropout=0.0)
    assert model.cfg["encoder_layerdrop"] == 0.0 and model.cfg["dropout"] == 0.0
    with pytest.raises(ValueError, match="encoder_layers"):
        load("beats", path, encoder_layers=2)


def test_random_init_warns_and_gives_tokens():
    with pytest.warns(UserWarning, match="NO PRETRAINED WEIGHTS"):
        model = load("beats")
    assert not model.pretrained and model.embed_dim == 192 and len(model.blocks) == 4
    waves = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        tokens, padding_mask = model.eval()(waves, torch.tensor([16000, 8000]))
    # 98 and 48 frames -> 6 and 3 time patches of 8 frequency patches
    assert tokens.shape == (2, 48, 192)
    assert padding_mask.sum(1).tolist() == [0, 24] and torch.isfinite(tokens).all()
    assert len(lora_targets(model)) == 4 * 4


def test_release_config_is_beats_iter3():
    config = beats.CONFIGS["release"]
    assert (config.embed_dim, config.encoder_embed_dim, config.encoder_layers) == (512, 768, 12)
    assert (config.encoder_attention_heads, config.encoder_ffn_embed_dim) == (12, 3072)
    assert config.deep_norm and config.gru_rel_pos and not config.layer_norm_first
    assert beats.DEFAULT_CONFIG == "cpu" and {"release", "cpu"} <= set(beats.CONFIGS)
    with torch.device("meta"):  # shapes only, no memory
        model = beats.build("release")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(90.3e6, rel=0.01)


def _train_step(model, waves, lengths):
    model.zero_grad()
    tokens, padding_mask = model(waves, lengths)
    (tokens[~padding_mask] ** 2).mean().backward()
    return tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_and_layer_gradient_decay():
    torch.manual_seed(0)
    options = dict(dropout=0.0, attention_dropout=0.0, encoder_layerdrop=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = beats.build("cpu", encoder_layers=2, layer_wise_gradient_decay_ratio=1.0, **options).train()
    waves, lengths = torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6000])
    tokens, grads = _train_step(model, waves, lengths)
    for name in (
        "encoder.layers.0.self_attn.relative_attention_bias.weight",
        "encoder.layers.1.self_attn.grep_a",
    ):
        assert grads[name].abs().sum() > 0

    model.set_gradient_checkpointing(True)
    tokens_ckpt, grads_ckpt = _train_step(model, waves, lengths)
    torch.testing.assert_close(tokens_ckpt, tokens)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)

    # the official layer-wise decay: same outputs, gradients below layer 0 scaled by ratio ** layers
    model.set_gradient_checkpointing(False)
    model.encoder.config = dataclasses.replace(model.encoder.config, layer_wise_gradient_decay_ratio=0.5)
    tokens_decay, grads_decay = _train_step(model, waves, lengths)
    torch.testing.assert_close(tokens_decay, tokens)
    torch.testing.assert_close(grads_decay["patch_embedding.weight"], grads["patch_embedding.weight"] * 0.25)


@pytest.mark.parametrize(
    "waves, lengths, message",
    [
        (torch.zeros(1, 2799), None, "too short"),
        (torch.zeros(2, 16000), torch.tensor([16000, 2000]), r"clips \[1\] are too short"),
        (torch.zeros(1, 2, 16000), None, "2-D tensor"),
    ],
)
def test_bad_waves_raise(waves, lengths, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load("beats")
    with pytest.raises(ValueError, match=message):
        model(waves, lengths)


def test_unknown_config_or_option():
    with pytest.raises(ValueError, match="unknown BEATs config"):
        beats.build("huge")
    with pytest.raises(ValueError, match="unknown BEATs option"):
        beats.build("cpu", heads=3)


def _unit_model() -> beats.BEATs:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init: the no-pretrained-weights warning
        return beats.build("unit").eval()


def test_grid_tokens_are_forward_tokens_on_the_time_x_frequency_grid():
    model = _unit_model()
    assert model.has_grid
    gen = torch.Generator().manual_seed(3)
    a, b = 0.1 * torch.randn(16000, generator=gen), 0.1 * torch.randn(9000, generator=gen)
    waves, lengths = _padded(a, b)
    with torch.no_grad():
        tokens, padding_mask = model(waves, lengths)
        grid, grid_mask = model.grid_tokens(waves, lengths)
        alone, alone_mask = model.grid_tokens(b[None], torch.tensor([len(b)]))
    # 98 and 54 fbank frames: 6 and 3 time patches, each of 8 frequency patches
    assert grid.shape == (2, 6, 8, model.embed_dim)
    assert grid_mask.tolist() == [[False] * 6, [False] * 3 + [True] * 3]
    torch.testing.assert_close(grid.reshape(2, 48, -1), tokens, rtol=0, atol=0)  # time-major: t * 8 + f
    assert torch.equal(grid_mask.repeat_interleave(8, dim=1), padding_mask)
    assert alone.shape == (1, 3, 8, model.embed_dim) and not alone_mask.any()
    torch.testing.assert_close(grid[1:, :3], alone, rtol=0, atol=ATOL)  # batch invariant
    with pytest.raises(ValueError, match="takes no reference input"):
        model.grid_tokens(waves, lengths, reference=waves)
