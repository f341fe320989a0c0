"""The backbone factory: names, checkpoint acquisition (path, URL, Hugging Face id), LoRA merge."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from kit import backbones
from kit.lora import add_lora, load_adapters, merge_lora, save_adapters

pytestmark = pytest.mark.filterwarnings("ignore:.*NO PRETRAINED")


def test_unknown_backbone_and_config_are_named():
    with pytest.raises(ValueError, match="unknown backbone 'wav2vec'.*beats, eat, fisher"):
        backbones.load("wav2vec")
    with pytest.raises(ValueError, match="unknown eat config 'huge'"):
        backbones.load("eat", config="huge")
    assert "cpu" in backbones.configs("fisher")


def test_random_init_says_no_pretrained_weights():
    with pytest.warns(UserWarning, match="NO PRETRAINED WEIGHTS"):
        model = backbones.load("beats", config="unit")
    assert model.pretrained is False


@pytest.fixture()
def served(tmp_path, backbone_fixtures):
    """The BEATs fixture checkpoint behind a local HTTP server."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(backbone_fixtures / "beats_release.pt", site / "beats_release.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_checkpoint_from_a_url_is_cached(served, tmp_path, backbone_fixtures):
    model = backbones.load("beats", f"{served}/beats_release.pt", cache_dir=tmp_path / "cache")
    assert model.pretrained is True
    cached = tmp_path / "cache" / "urls" / "beats_release.pt"
    assert cached.read_bytes() == (backbone_fixtures / "beats_release.pt").read_bytes()
    local = backbones.load("beats", backbone_fixtures / "beats_release.pt")
    for (name, a), (_, b) in zip(model.state_dict().items(), local.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_unreachable_sources_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(backbones.CheckpointError, match="cannot download checkpoint") as err:
        backbones.resolve_checkpoint("http://127.0.0.1:9/none.pt", tmp_path)
    assert f"copy it to {tmp_path / 'urls' / 'none.pt'}" in str(err.value)  # what to do offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        backbones.CheckpointError, match="cannot fetch Hugging Face repo 'worstchan/EAT-base'"
    ):
        backbones.resolve_checkpoint("worstchan/EAT-base", tmp_path)
    with pytest.raises(backbones.CheckpointError, match="neither an existing path"):
        backbones.resolve_checkpoint("no such file", tmp_path)
    # A missing local path is reported as such, never sent to the Hugging Face hub
    for spec in ("no such file.pt", "ckpt/BEATs.pt", "./ckpt/BEATs", "runs/x/model/last.pt"):
        with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: .*{Path(spec).name}"):
            backbones.resolve_checkpoint(spec, tmp_path)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(backbones.CheckpointNotFoundError, match="ckpt/BEATs"):
        backbones.resolve_checkpoint(str(tmp_path / "ckpt" / "BEATs"), tmp_path)


@pytest.mark.parametrize("name", ["beats", "eat", "fisher"])
def test_lora_adapters_save_load_and_merge(name, tmp_path):
    torch.manual_seed(0)
    model = backbones.load(name, config="unit").eval()
    add_lora(model, rank=4)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    waves, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    with torch.no_grad():
        expected = model(waves, lengths)[0]
    save_adapters(model, tmp_path / "a.safetensors")

    torch.manual_seed(0)
    fresh = add_lora(backbones.load(name, config="unit").eval(), rank=4)
    load_adapters(fresh, tmp_path / "a.safetensors")
    merged = merge_lora(fresh)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(waves, lengths)[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["beats", "eat", "fisher", "cnn", "logmel"])
def test_a_backbone_without_a_reference_input_refuses_one(name):
    model = backbones.load(name).eval()
    assert model.takes_reference is False
    waves = torch.randn(1, 16000) * 0.1
    with pytest.raises(ValueError, match=f"{name} takes no reference input"):
        model(waves, torch.tensor([16000]), reference=waves)
    tokens, mask = model(waves, torch.tensor([16000]), reference=None)
    assert tokens.shape[:2] == mask.shape
