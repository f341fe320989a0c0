"""The shared checkpoint loader: which file a path means, reading without pickled code, the strict load
naming keys and shapes, and the filter's errors carrying the file name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kit.backbones import Backbone, CheckpointError, CheckpointNotFoundError, loading


class Tiny(Backbone):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(2, width)


def _tiny_state(width: int = 3) -> dict[str, torch.Tensor]:
    return {"linear.weight": torch.arange(2.0 * width).view(width, 2), "linear.bias": torch.ones(width)}


def test_a_path_means_a_file_a_run_folder_a_single_file_or_a_hugging_face_folder(tmp_path):
    torch.save({}, tmp_path / "a.pt")
    assert loading.checkpoint_file(tmp_path / "a.pt", "X") == tmp_path / "a.pt"
    assert loading.checkpoint_file(tmp_path, "X") == tmp_path / "a.pt"  # the only .pt in the folder
    torch.save({}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"expected one X checkpoint file .*\['a.pt', 'b.pth'\]"):
        loading.checkpoint_file(tmp_path, "X")
    torch.save({}, tmp_path / "model.pt")  # a kit.train run folder
    assert loading.checkpoint_file(tmp_path, "X") == tmp_path / "model.pt"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"missing \['model.safetensors'\]"):
        loading.checkpoint_file(hf, "X")
    save_file({"w": torch.zeros(1)}, str(hf / "model.safetensors"))
    assert loading.checkpoint_file(hf, "X") == hf
    with pytest.raises(CheckpointNotFoundError, match="X checkpoint not found: .*absent.pt"):
        loading.checkpoint_file(tmp_path / "absent.pt", "X")


def test_reading_gives_what_the_file_holds_or_an_error_naming_it(tmp_path):
    torch.save({"cfg": {"a": 1}, "model": _tiny_state()}, tmp_path / "ok.pt")
    raw = loading.read_checkpoint(tmp_path / "ok.pt", "X")
    assert raw["cfg"] == {"a": 1} and torch.equal(raw["model"]["linear.bias"], torch.ones(3))
    save_file(_tiny_state(), str(tmp_path / "w.safetensors"))
    assert set(loading.read_checkpoint(tmp_path / "w.safetensors", "X")) == {"linear.weight", "linear.bias"}
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    for name in ("junk.pt", "cut.pt"):
        with pytest.raises(CheckpointError, match=f"cannot read X checkpoint .*{name}: not a readable torch"):
            loading.read_checkpoint(tmp_path / name, "X")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors"):
        loading.read_checkpoint(tmp_path / "bad.safetensors", "X")

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"depth": 2}))
    save_file(_tiny_state(), str(hf / "model.safetensors"))
    raw = loading.read_checkpoint(hf, "X")
    assert raw["config.json"] == {"depth": 2} and set(raw["model.safetensors"]) == set(_tiny_state())
    (hf / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        loading.read_checkpoint(hf, "X")


def test_strict_load_names_missing_unexpected_and_misshapen_keys():
    model = loading.strict_load(Tiny(), _tiny_state(), "file.pt", "X")
    assert torch.equal(model.linear.weight, _tiny_state()["linear.weight"])
    state = _tiny_state()
    del state["linear.bias"]
    state["linear.extra"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"file.pt: the X weights .* missing \['linear.bias'\], unexpected \['linear.extra'\] \(hint\)",
    ):
        loading.strict_load(Tiny(), state, "file.pt", "X", hint=" (hint)")
    with pytest.raises(CheckpointError, match=r"linear.weight has shape \(4, 2\) .* expects \(3, 2\)"):
        loading.strict_load(Tiny(), _tiny_state(width=4), "file.pt", "X")
    with pytest.raises(CheckpointError, match="linear.bias is a list, expected a tensor"):
        loading.strict_load(Tiny(), {**_tiny_state(), "linear.bias": [1.0, 1.0, 1.0]}, "file.pt", "X")
    many = {f"k{i:02d}": torch.zeros(1) for i in range(13)}
    with pytest.raises(CheckpointError, match=r"'k09'\] and 3 more"):
        loading.strict_load(Tiny(), {**_tiny_state(), **many}, "file.pt", "X")


def test_load_checkpoint_filters_builds_loads_and_marks_pretrained(tmp_path):
    torch.save({"width": 3, "weights": _tiny_state()}, tmp_path / "tiny.pt")

    def filter_state(raw):
        if "width" not in raw:
            raise CheckpointError("no width: not a Tiny checkpoint")
        return raw["width"], raw["weights"]

    model = loading.load_checkpoint(tmp_path, "Tiny", filter_state, Tiny)
    assert model.pretrained and not Tiny().pretrained
    assert torch.equal(model.linear.bias, torch.ones(3))
    torch.save({"weights": _tiny_state()}, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"tiny.pt: no width: not a Tiny checkpoint"):
        loading.load_checkpoint(tmp_path / "tiny.pt", "Tiny", filter_state, Tiny)


def test_filters_are_pure_functions_of_what_was_read(backbone_fixtures):
    from kit.backbones import beats, eat, fisher

    for module, fixture in ((beats, "beats_release.pt"), (eat, "eat_fairseq.pt"), (fisher, "fisher.pt")):
        raw = loading.read_checkpoint(backbone_fixtures / fixture, module.__name__)
        before = {k: v.clone() for k, v in raw["model"].items()}
        config, state = module.filter_state(raw)
        assert type(config).__name__.endswith("Config") and state
        assert raw["model"].keys() == before.keys()  # the read checkpoint is left as it was
        assert all(torch.equal(raw["model"][k], v) for k, v in before.items())
    hf = loading.read_checkpoint(backbone_fixtures / "eat_hf", "EAT")
    config, state = eat.filter_state(hf)
    fairseq_config, fairseq_state = eat.filter_state(
        loading.read_checkpoint(backbone_fixtures / "eat_fairseq.pt", "EAT")
    )
    assert config == fairseq_config and state.keys() == fairseq_state.keys()


@pytest.mark.parametrize(
    "page",
    [
        b"<!DOCTYPE html><html><head><title>OneDrive</title>",
        b"\n  <html lang='en'>",
        b"<?xml version='1.0'?>",
    ],
)
def test_a_web_page_is_named_as_such_with_what_to_do(tmp_path, page):
    path = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    path.write_bytes(page + b" sign in to download " * 50)
    with pytest.raises(
        CheckpointError, match=r"BEATs_iter3_plus_AS2M\.pt is a web page \(HTML\), not a X"
    ) as info:
        loading.read_checkpoint(path, "X")
    message = str(info.value)
    assert "download the file" in message and "dcase-kit checkpoints" in message
    assert "weights_only" not in message and path.exists()  # a file the user gave is never deleted


def test_a_web_page_downloaded_into_the_cache_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DEFAULT_CACHE", tmp_path)
    (tmp_path / "urls").mkdir()
    path = tmp_path / "urls" / "model.pt"
    path.write_bytes(b"<!doctype html><p>redirect</p>")
    with pytest.raises(CheckpointError, match="removed from the cache"):
        loading.read_checkpoint(path, "X")
    assert not path.exists()  # the next attempt downloads again instead of reading the page


def test_read_errors_never_suggest_turning_weights_only_off(tmp_path):
    """torch.load's message advises weights_only=False (which runs the file's pickled code): never passed on."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        loading.read_checkpoint(tmp_path / "junk.pt", "X")
    message = str(info.value)
    assert "weights_only" not in message and "trusted source" not in message and "allowlist" not in message
    assert "junk.pt: not a readable torch checkpoint" in message and "a safe read" in message
    try:
        torch.load(tmp_path / "junk.pt", weights_only=True)
    except Exception as err:  # the raw advice, as torch words it, is stripped by describe_load_error
        assert "weights_only" in str(err) and "weights_only" not in loading.describe_load_error(err)


def test_a_hugging_face_folder_may_hold_pytorch_model_bin(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"width": 3}))
    torch.save(_tiny_state(), tmp_path / "pytorch_model.bin")
    assert loading.checkpoint_file(tmp_path, "X") == tmp_path
    raw = loading.read_checkpoint(tmp_path, "X")
    assert raw["config.json"] == {"width": 3} and set(raw["model.safetensors"]) == set(_tiny_state())
