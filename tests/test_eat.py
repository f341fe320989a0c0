"""EAT backbone: the official outputs for both checkpoint layouts, batching, padding mask, errors, LoRA."""

from __future__ import annotations

import enum
import json
import shutil

import numpy as np
import pytest
import torch

from kit.backbones import CheckpointError, eat, load, lora_targets

LENGTHS = (1024, 1600)
LAYOUTS = ("eat_fairseq.pt", "eat_hf")


@pytest.fixture(scope="module")
def expected(backbone_fixtures):
    return dict(np.load(backbone_fixtures / "eat_expected.npz"))


@pytest.fixture(scope="module")
def fairseq_checkpoint(backbone_fixtures):
    return torch.load(backbone_fixtures / "eat_fairseq.pt", weights_only=True)


@pytest.fixture(scope="module")
def models(backbone_fixtures):
    return {
        (layout, length): load("eat", backbone_fixtures / layout, target_length=length)
        for layout in LAYOUTS
        for length in LENGTHS
    }


def _close(actual: torch.Tensor, reference: np.ndarray) -> None:
    assert actual.shape == reference.shape
    np.testing.assert_allclose(actual.detach().numpy(), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("clip", ("a", "b"))
def test_matches_official_outputs(models, audio, expected, layout, length, clip):
    model = models[(layout, length)]
    wave = audio[clip][None]
    with torch.no_grad():
        features, n_frames = model.frontend(wave)
        tokens = model.encode(features)
    _close(features, expected[f"{clip}_fbank_{length}"])
    _close(tokens, expected[f"{clip}_features_{length}"])
    assert model.pretrained and model.embed_dim == tokens.shape[-1] == 48
    assert n_frames.tolist() == [1 + (wave.shape[1] - 400) // 160]


@pytest.mark.parametrize("length", LENGTHS)
def test_batch_equals_single_runs_and_mask_marks_padding(models, audio, expected, length):
    model = models[("eat_fairseq.pt", length)]
    a, b = audio["a"], audio["b"]
    waves = torch.zeros(2, a.numel())
    waves[0], waves[1, : b.numel()] = a, b
    with torch.no_grad():
        tokens, mask = model(waves, torch.tensor([a.numel(), b.numel()]))
    _close(tokens[0:1], expected[f"a_features_{length}"])
    _close(tokens[1:2], expected[f"b_features_{length}"])
    # a: 198 frames -> time patches 0..12 hold audio; b: 158 frames -> 0..9. 8 frequency patches each.
    time_patches = length // 16
    patch_time = torch.arange(time_patches).repeat_interleave(8)
    assert mask.shape == (2, 1 + time_patches * 8)
    assert not mask[:, 0].any()
    assert torch.equal(mask[0, 1:], patch_time >= 13)
    assert torch.equal(mask[1, 1:], patch_time >= 10)


def test_clip_longer_than_target_length_is_cut(audio):
    model = build_quietly(target_length=64)
    long_model = build_quietly(target_length=1024)
    with torch.no_grad():
        cut, n_cut = model.frontend(audio["a"][None])
        full, _ = long_model.frontend(audio["a"][None])
        _, mask = model(audio["a"][None])
    assert cut.shape == (1, 1, 64, 128) and n_cut.tolist() == [64]
    assert torch.equal(cut, full[:, :, :64])
    assert not mask.any()


def build_quietly(**options) -> eat.EAT:
    """A small random EAT (64-dim, 2 blocks unless overridden), without the factory's warning."""
    torch.manual_seed(0)
    return eat.build("cpu", **{"embed_dim": 64, "depth": 2, **options}).eval()


def test_random_init_warns_and_runs():
    with pytest.warns(UserWarning, match="NO PRETRAINED WEIGHTS"):
        model = load("eat", target_length=64)
    assert not model.pretrained and model.embed_dim == eat.CONFIGS["cpu"].embed_dim
    with torch.no_grad():
        tokens, mask = model(torch.randn(2, 8000), torch.tensor([8000, 3000]))
    assert tokens.shape == (2, 1 + 4 * 8, model.embed_dim) and mask.shape == (2, 33)
    assert torch.isfinite(tokens).all()


def test_random_init_positions_are_the_official_table(fairseq_checkpoint):
    # The fixture's positions were perturbed by a tiny amount after the official sin-cos init.
    stored = fairseq_checkpoint["model"]["modality_encoders.IMAGE.fixed_positional_encoder.positions"]
    table = eat.sincos_positions(48, 768, 8)
    assert table.shape == stored.shape
    assert (table - stored).abs().max() < 1e-3


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="multiple of 16"):
        eat.build("cpu", target_length=1000)
    with pytest.raises(ValueError, match="positions cover only"):
        eat.build("cpu", target_length=16 * 769)
    with pytest.raises(ValueError, match="unknown EAT config"):
        eat.build("huge")
    with pytest.raises(ValueError, match="unknown EAT option"):
        eat.build("cpu", depthh=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        eat.build("cpu", embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        build_quietly(target_length=64).frontend(torch.zeros(1, 2, 16000))


def test_lora_pattern_selects_block_attention_only():
    model = build_quietly(target_length=64)
    depth = model.config.depth
    assert lora_targets(model) == [
        f"blocks.{i}.attn.{name}" for i in range(depth) for name in ("qkv", "proj")
    ]
    assert "local_encoder.proj" not in lora_targets(model)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(eat, "checkpoint", counting_checkpoint)
    waves = torch.randn(2, 6000)
    gradients = []
    for enabled in (False, True):
        model = build_quietly(target_length=64).train()
        model.set_gradient_checkpointing(enabled)
        tokens, _ = model(waves)
        tokens.square().mean().backward()
        gradients.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert len(calls) == 2  # both blocks, only when enabled
    torch.testing.assert_close(gradients[0], gradients[1])


def test_finetuned_fairseq_layout_loads(tmp_path, fairseq_checkpoint, audio, expected):
    # The AS2M fine-tuned files wrap the encoder under "model." and add a classification head.
    weights = {
        f"model.{key}": value for key, value in fairseq_checkpoint["model"].items() if ".decoder." not in key
    }
    weights.update({"fc_norm.weight": torch.ones(48), "fc_norm.bias": torch.zeros(48)})
    weights.update({"head.weight": torch.zeros(527, 48), "head.bias": torch.zeros(527)})
    cfg = {"model": {"_name": "mae_image_classification", "pretrained_model_args": fairseq_checkpoint["cfg"]}}
    torch.save({"cfg": cfg, "model": weights}, tmp_path / "finetuned.pt")
    model = load("eat", tmp_path / "finetuned.pt")
    with torch.no_grad():
        tokens, _ = model(audio["a"][None])
    _close(tokens, expected["a_features_1024"])


class _Modality(enum.Enum):
    IMAGE = 1


class _Meter:
    def __init__(self) -> None:
        self.value = 1.0


def test_training_bookkeeping_in_checkpoint_is_ignored(tmp_path, fairseq_checkpoint, audio, expected):
    # Official files carry enums, meters, numpy scalars and the EMA teacher besides the weights.
    checkpoint = {
        "cfg": json.loads(json.dumps(fairseq_checkpoint["cfg"])),
        "model": dict(fairseq_checkpoint["model"]),
    }
    checkpoint["cfg"]["model"]["supported_modality"] = _Modality.IMAGE
    checkpoint["extra_state"] = {"loss": np.float64(1.5), "meter": _Meter()}
    checkpoint["model"]["_ema"] = {"blocks.0.norm1.weight": torch.ones(48)}
    torch.save(checkpoint, tmp_path / "official.pt")
    model = load("eat", tmp_path / "official.pt")
    with torch.no_grad():
        tokens, _ = model(audio["b"][None])
    _close(tokens, expected["b_features_1024"])


@pytest.mark.parametrize(("fixture", "backbone"), [("beats_release.pt", "BEATS"), ("fisher.pt", "FISHER")])
def test_other_backbones_are_named(backbone_fixtures, fixture, backbone):
    with pytest.raises(CheckpointError, match=f"{backbone} checkpoint, not EAT"):
        load("eat", backbone_fixtures / fixture)


def test_corrupt_files_are_reported(tmp_path, backbone_fixtures):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load("eat", garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((backbone_fixtures / "eat_fairseq.pt").read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load("eat", truncated)
    folder = tmp_path / "hf"
    shutil.copytree(backbone_fixtures / "eat_hf", folder)
    (folder / "model.safetensors").chmod(0o644)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load("eat", folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['model.safetensors'\]"):
        load("eat", folder)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        eat.from_checkpoint(tmp_path / "nowhere.pt")


def _save_modified(tmp_path, checkpoint, change) -> str:
    weights = dict(checkpoint["model"])
    change(weights)
    path = tmp_path / "modified.pt"
    torch.save({"cfg": checkpoint["cfg"], "model": weights}, path)
    return str(path)


def test_key_and_shape_mismatches_are_named(tmp_path, fairseq_checkpoint):
    qkv = "blocks.1.attn.qkv.weight"
    path = _save_modified(tmp_path, fairseq_checkpoint, lambda w: w.pop(qkv))
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.attn.qkv.weight'\], unexpected \[\]"):
        load("eat", path)
    path = _save_modified(
        tmp_path, fairseq_checkpoint, lambda w: w.update({"blocks.3.norm1.weight": torch.ones(48)})
    )
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['blocks.3.norm1.weight'\]"):
        load("eat", path)
    path = _save_modified(tmp_path, fairseq_checkpoint, lambda w: w.update({qkv: torch.zeros(144, 40)}))
    with pytest.raises(
        CheckpointError, match=r"blocks.1.attn.qkv.weight has shape \(144, 40\).*expects \(144, 48\)"
    ):
        load("eat", path)


def test_unsupported_variant_is_refused(tmp_path, backbone_fixtures):
    folder = tmp_path / "hf"
    shutil.copytree(backbone_fixtures / "eat_hf", folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_first"] = True
    (folder / "config.json").chmod(0o644)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer_norm_first"):
        load("eat", folder)


def test_grid_tokens_drop_cls_and_keep_the_time_major_patch_order(models, audio, expected):
    model = models[("eat_fairseq.pt", 1024)]
    a, b = audio["a"], audio["b"]
    waves = torch.zeros(2, a.numel())
    waves[0], waves[1, : b.numel()] = a, b
    lengths = torch.tensor([a.numel(), b.numel()])
    assert model.has_grid
    with torch.no_grad():
        tokens, mask = model(waves, lengths)
        grid, grid_mask = model.grid_tokens(waves, lengths)
    assert grid.shape == (2, 64, 8, model.embed_dim) and grid_mask.shape == (2, 64)
    # patch token 1 + t * 8 + f sits at grid[t, f]
    assert torch.equal(grid[:, 5, 3], tokens[:, 1 + 5 * 8 + 3])
    assert torch.equal(grid.reshape(2, 64 * 8, -1), tokens[:, 1:])
    assert torch.equal(grid_mask.repeat_interleave(8, dim=1), mask[:, 1:])
    assert (~grid_mask).sum(1).tolist() == [13, 10]  # a: 198 frames, b: 158 frames (16 per patch)
    # the official single-clip outputs, CLS dropped, on the grid
    reference = torch.from_numpy(expected["b_features_1024"][:, 1:]).reshape(1, 64, 8, -1)
    _close(grid[1:], reference.numpy())


def test_grid_tokens_patch_order_follows_the_mel_axis():
    # no blocks: a patch token is its own patch's embedding plus its position, so the grid cell of a
    # patch that alone differs between two inputs shows where the tokens put it
    model = build_quietly(target_length=64, depth=0)
    waves = torch.randn(1, 16000) * 0.01
    features, _ = model.frontend(waves)
    changed = features.clone()
    changed[0, 0, 16:32, 48:64] += 1.0  # time patch 1, mel patch 3
    with torch.no_grad():
        base = model.encode(features)[:, 1:].reshape(1, 4, 8, -1)
        moved = model.encode(changed)[:, 1:].reshape(1, 4, 8, -1)
    differs = (base - moved).abs().amax(-1)[0] > 1e-6
    assert differs.nonzero().tolist() == [[1, 3]]
