"""FISHER backbone: the authors' outputs on the official-format fixture, both paths, batch invariance,
checkpoint errors, random initialisation and the LoRA pattern."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kit import backbones
from kit.backbones import CheckpointError, fisher

TOLERANCE = 1e-4
PATHS = {"nopad": None, "pad1024": 1024}


@pytest.fixture(scope="module")
def expected(backbone_fixtures):
    return dict(np.load(backbone_fixtures / "fisher_expected.npz"))


@pytest.fixture(scope="module")
def models(backbone_fixtures):
    path = backbone_fixtures / "fisher.pt"
    return {label: backbones.load("fisher", path, pad_to=pad_to).eval() for label, pad_to in PATHS.items()}


@pytest.fixture(scope="module")
def release(backbone_fixtures):
    return torch.load(backbone_fixtures / "fisher.pt", weights_only=True)


def padded_batch(audio) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = audio["a"], audio["b"]
    waves = torch.zeros(2, len(a))
    waves[0], waves[1, : len(b)] = a, b
    return waves, torch.tensor([len(a), len(b)])


@pytest.mark.parametrize("clip", ["a", "b"])
def test_frontend_matches_reference_spectrum(models, audio, expected, clip):
    spec, frames = models["nopad"].frontend(audio[clip][None])
    reference = expected[f"{clip}_spec"]
    assert spec.shape == reference.shape
    assert frames.tolist() == [reference.shape[1]]
    np.testing.assert_allclose(spec.numpy(), reference, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clip", ["a", "b"])
def test_embedding_matches_reference(models, audio, expected, path, clip):
    with torch.no_grad():
        embedding = models[path].embedding(audio[clip][None])
    reference = expected[f"{clip}_features_{path}"]
    np.testing.assert_allclose(embedding.numpy().reshape(reference.shape), reference, rtol=0, atol=TOLERANCE)


def test_two_paths_differ(models, audio):
    with torch.no_grad():
        outputs = [models[path].embedding(audio["b"][None]) for path in PATHS]
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("path", PATHS)
def test_padded_batch_equals_single_runs(models, audio, expected, path):
    waves, lengths = padded_batch(audio)
    with torch.no_grad():
        tokens, padding_mask = models[path](waves, lengths)
    model = models[path]
    assert tokens.shape == (2, model.n_bands, model.embed_dim)
    assert padding_mask.shape == (2, model.n_bands) and not padding_mask.any()
    for row, clip in enumerate("ab"):
        reference = expected[f"{clip}_features_{path}"]
        np.testing.assert_allclose(tokens[row].flatten().numpy(), reference.ravel(), rtol=0, atol=TOLERANCE)


def test_loaded_model_reports_release_architecture(models):
    model = models["nopad"]
    assert model.pretrained
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (48, 3, 3)
    assert model.n_bands == 2 and model.pad_to is None and models["pad1024"].pad_to == 1024


def test_lora_pattern_selects_only_block_attention(models):
    model = models["nopad"]
    expected = {f"blocks.{i}.attn.{name}" for i in range(len(model.blocks)) for name in ("qkv", "proj")}
    assert set(backbones.lora_targets(model)) == expected
    assert not re.fullmatch(model.lora_target_modules, "patch_embed")


def test_random_init_warns_and_runs(audio):
    with pytest.warns(UserWarning, match="NO PRETRAINED WEIGHTS"):
        model = backbones.load("fisher")
    assert not model.pretrained
    tokens, padding_mask = model(audio["b"][None])
    assert tokens.shape == (1, 2, fisher.CONFIGS[fisher.DEFAULT_CONFIG].embed_dim)
    assert torch.isfinite(tokens).all() and not padding_mask.any()


def test_release_sizes():
    assert {"tiny", "mini", "small", "cpu"} <= set(fisher.CONFIGS)
    counts = {name: sum(p.numel() for p in fisher.build(name).parameters()) for name in ("tiny", "small")}
    assert 5.0e6 < counts["tiny"] < 6.0e6
    assert 21.0e6 < counts["small"] < 22.5e6


def test_gradient_checkpointing_keeps_outputs_and_gradients(audio):
    torch.manual_seed(0)
    model = fisher.build("cpu", depth=2)
    wave = audio["b"][None, :8000]
    plain = model(wave)[0]
    plain.sum().backward()
    grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    checkpointed = model(wave)[0]
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, grad)


def test_pre_ln_block_follows_reference_formula():
    torch.manual_seed(0)
    model = fisher.build("cpu", depth=1, layer_norm_first=True)
    assert model.pre_norm is None and model.norm is not None
    block = model.blocks[0]
    x = torch.randn(2, 5, model.embed_dim)
    after_attention = x + block.attn(block.norm1(x), None)
    torch.testing.assert_close(block(x, None), 2 * block.mlp(block.norm2(after_attention)))


def test_beats_checkpoint_is_rejected(backbone_fixtures):
    with pytest.raises(CheckpointError, match="BEATs"):
        backbones.load("fisher", backbone_fixtures / "beats_release.pt")


def test_eat_checkpoint_is_rejected(backbone_fixtures):
    with pytest.raises(CheckpointError, match="band_width.*EAT"):
        backbones.load("fisher", backbone_fixtures / "eat_fairseq.pt")


def test_corrupt_file_is_rejected(tmp_path):
    path = tmp_path / "fisher.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read FISHER checkpoint .*fisher.pt"):
        fisher.from_checkpoint(path)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        fisher.from_checkpoint(tmp_path / "absent.pt")


def test_missing_and_unexpected_keys_are_named(tmp_path, release):
    state = dict(release["model"])
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pt"
    torch.save({"cfg": release["cfg"], "model": state}, path)
    with pytest.raises(
        CheckpointError,
        match=r"missing \['blocks.1.mlp.fc2.bias'\], unexpected \['blocks.0.attn.extra.weight'\]",
    ):
        fisher.from_checkpoint(path)


def test_wrong_shape_names_key_and_shapes(tmp_path, release):
    state = dict(release["model"])
    state["blocks.2.attn.qkv.weight"] = torch.zeros(144, 40)
    path = tmp_path / "shape.pt"
    torch.save({"cfg": release["cfg"], "model": state}, path)
    with pytest.raises(CheckpointError, match=r"blocks.2.attn.qkv.weight has shape \(144, 40\).*\(144, 48\)"):
        fisher.from_checkpoint(path)


def test_heads_come_from_cfg(tmp_path, release):
    cfg = {"model": {**release["cfg"]["model"], "num_heads": 4}}
    path = tmp_path / "heads.pt"
    torch.save({"cfg": cfg, "model": release["model"]}, path)
    assert fisher.from_checkpoint(path).blocks[0].attn.num_heads == 4


@pytest.mark.parametrize(
    ("waves", "lengths", "message"),
    [
        (torch.zeros(16000), None, "shape"),
        (torch.full((1, 16000), float("nan")), None, "NaN"),
        (torch.zeros(2, 16000), torch.tensor([16000, 16001]), "exceed"),
        (torch.zeros(1, 300), None, "at least 400 samples"),
    ],
)
def test_bad_input_is_rejected(waves, lengths, message):
    model = fisher.build("cpu", depth=1)
    with pytest.raises(ValueError, match=message):
        model(waves, lengths)


@pytest.mark.parametrize("options", [{"pad_to": 0}, {"pad_to": 40000}, {"widht": 3}])
def test_bad_options_are_rejected(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        fisher.build("cpu", **options)


@pytest.mark.parametrize("options", [{"max_frames": 0}, {"pad_to": 1024, "max_frames": 1024}])
def test_bad_frame_limits_are_rejected(options):
    with pytest.raises(ValueError, match="max_frames"):
        fisher.build("unit", **options)


def test_readme_path_embeds_the_whole_clip_unless_told_to_cut():
    """A 12-s clip: by default the last 2 s change the output; max_frames=1024 (the README script's cut)
    ignores them, and the cut is announced as the backbone's input limit."""
    torch.manual_seed(0)
    whole = fisher.build("unit").eval()
    cut = fisher.build("unit", max_frames=1024).eval()
    cut.load_state_dict(whole.state_dict())
    clip = torch.randn(1, 12 * 16000) * 0.1
    changed_end = clip.clone()
    changed_end[:, -16000:] = clip[:, -16000:].flip(-1) * 3  # zero mean kept: the clip's mean is removed
    changed_end[:, -16000:] -= changed_end[:, -16000:].mean() - clip[:, -16000:].mean()
    with torch.no_grad():
        assert not torch.allclose(whole.embedding(clip), whole.embedding(changed_end))
        torch.testing.assert_close(cut.embedding(clip), cut.embedding(changed_end))
    assert whole.max_input_seconds is None and cut.max_input_seconds == pytest.approx(10.24)


@pytest.mark.parametrize("path", PATHS)
def test_grid_tokens_shape_mask_and_batch_invariance(models, audio, expected, path):
    model = models[path]
    waves, lengths = padded_batch(audio)
    assert model.has_grid
    with torch.no_grad():
        grid, mask = model.grid_tokens(waves, lengths)
        cls, _ = model(waves, lengths)
        alone = [model.grid_tokens(audio[clip][None]) for clip in "ab"]
    bands = model.n_bands * model.freq_patches  # each band's frequency patches, band after band
    # a: 198 frames, b: 158. README path: whole patches of the clip (12, 9); pad_to 1024: 64 patches,
    # those holding some of the clip's frames are content (13, 10)
    time_patches, own = (12, [12, 9]) if PATHS[path] is None else (64, [13, 10])
    assert grid.shape == (2, time_patches, bands, model.embed_dim) and mask.shape == (2, time_patches)
    assert (~mask).sum(1).tolist() == own and not mask[:, 0].any()
    for row, (single, single_mask) in enumerate(alone):
        assert not single_mask[:, : own[row]].any()
        np.testing.assert_allclose(
            grid[row, : own[row]].numpy(), single[0, : own[row]].numpy(), rtol=0, atol=TOLERANCE
        )
    # the band CLS tokens of the same pass are still the released model's
    np.testing.assert_allclose(
        cls[1].flatten().numpy(), expected[f"b_features_{path}"].ravel(), atol=TOLERANCE
    )


@pytest.mark.parametrize("flatten", ["freq", "time"])
def test_grid_tokens_put_each_patch_at_its_time_and_frequency(flatten):
    # no blocks and no positions: a grid cell is the LayerNorm of its own patch's embedding, so the
    # one cell that changes when one spectrum patch changes shows where the grid puts that patch
    torch.manual_seed(0)
    model = fisher.build("unit", depth=0, flatten=flatten).eval()
    model.positions.zero_()
    spec = torch.randn(1, 80, 201) * 0.1
    frames = torch.tensor([80])
    changed = spec.clone()
    changed[0, 32:48, 100 + 2 * 16 : 100 + 3 * 16] += 1.0  # time patch 2, band 1, its frequency patch 2

    def grid(features):
        def frontend(waves, lengths=None):
            return features, frames

        model.frontend = frontend  # the grid of a given spectrum
        with torch.no_grad():
            return model.grid_tokens(torch.zeros(1, 12960))[0]

    base, moved = grid(spec), grid(changed)
    assert base.shape == (1, 5, 2 * 6, model.embed_dim)
    differs = (base - moved).abs().amax(-1)[0] > 1e-6
    assert differs.nonzero().tolist() == [[2, 6 + 2]]


def _hugging_face_folder(folder, release, *, prefix, weights, nested):
    """The release weights and cfg in a Hugging Face layout: config.json (the release cfg['model'] at its
    top level beside the PretrainedConfig keys, or nested under cfg.model) and model.safetensors or
    pytorch_model.bin, the keys under ``prefix`` (a wrapper module's attribute)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    model_cfg = release["cfg"]["model"]
    fields = {"cfg": {"model": model_cfg}} if nested else dict(model_cfg)
    fields |= {"architectures": ["FISHERModel"], "model_type": "fisher", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(fields))
    state = {prefix + key: value.contiguous() for key, value in release["model"].items()}
    if weights == "model.safetensors":
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    return folder


@pytest.mark.parametrize(
    ("prefix", "weights", "nested"),
    [
        ("model.", "model.safetensors", False),
        ("", "pytorch_model.bin", True),
        ("fisher.", "model.safetensors", True),
    ],
)
def test_hugging_face_layouts_load_to_the_same_outputs(
    tmp_path, release, models, audio, prefix, weights, nested
):
    folder = _hugging_face_folder(
        tmp_path / "FISHER-small-0723", release, prefix=prefix, weights=weights, nested=nested
    )
    model = backbones.load("fisher", folder).eval()
    assert model.pretrained
    wave = audio["a"][None]
    with torch.no_grad():
        torch.testing.assert_close(model(wave)[0], models["nopad"](wave)[0], rtol=0, atol=0)


def test_a_hugging_face_folder_without_a_fisher_config_names_the_layouts(tmp_path, release):
    import json

    folder = _hugging_face_folder(
        tmp_path / "hf", release, prefix="", weights="model.safetensors", nested=False
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "eat", "depth": 12}))
    with pytest.raises(CheckpointError, match=r"no FISHER configuration .*release \.pt file .*torch\.save"):
        fisher.from_checkpoint(folder)
