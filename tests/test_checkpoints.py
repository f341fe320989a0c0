"""kit.checkpoints: the listing of every official release, and fetching the direct ones from a local
HTTP server standing for GitHub releases and the Hugging Face Hub (resumable, verified, web pages
refused), the fetched folders loading as they are."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from kit import backbones, checkpoints, cli
from kit.backbones import efficientat, nabeats
from kit.download import ChecksumError, DownloadError
from tests.test_download import _Handler


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.ignore_range, httpd.cut_after = {}, [], False, None
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_the_listing_says_for_every_backbone_where_each_file_comes_from_and_how_to_get_it():
    rows = checkpoints.releases()
    assert {r.backbone for r in rows} == {"beats", "eat", "fisher", "efficientat", "nabeats"}
    text = checkpoints.listing(rows)
    as2m = checkpoints.find("BEATs_iter3_plus_AS2M.pt")
    assert not as2m.direct and "OneDrive share page" in as2m.how_text() and "Download" in as2m.how_text()
    assert "audiocc_1" in as2m.use and "BEATS_CHECKPOINT" in as2m.use
    assert checkpoints.find("jiangab/FISHER-small-0723").use.startswith("audiocc_2")
    assert "EAT_CHECKPOINT" in checkpoints.find("EAT-base_epoch30_pretrain").use
    mn04 = checkpoints.find("mn04_as")
    assert mn04.size == 4_066_513 and mn04.sha256.startswith("899a8c62") and "4,066,513 bytes" in text
    assert mn04.url == "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/mn04_as_mAP_432.pt"
    seed0 = checkpoints.find("dcase2026_nabeats_seed0")
    assert seed0.url == nabeats.RELEASES["dcase2026_nabeats_seed0"] and seed0.with_files == ("BEATs_iter3",)
    for release in rows:  # every release says its size (or that none is published) and how to get it
        assert release.name in text and release.how_text() and release.size_text()
        assert release.direct == ("checkpoints fetch" in release.how_text())
    assert [r.backbone for r in checkpoints.releases("fisher")] == ["fisher"] * 3
    with pytest.raises(ValueError, match="no releases of backbone 'cnn'"):
        checkpoints.releases("cnn")
    with pytest.raises(KeyError, match="did you mean FISHER-small-0723"):
        checkpoints.find("FISHER-smal-0723")


def test_a_github_release_file_is_fetched_resumed_and_verified(
    server, tmp_path, monkeypatch, backbone_fixtures
):
    data = (backbone_fixtures / "efficientat" / "mn04_as_mAP_432.pt").read_bytes()
    server.files["/releases/mn04_as_mAP_432.pt"] = data
    monkeypatch.setattr(efficientat, "RELEASE_URL", f"{server.base}/releases/")
    (tmp_path / "mn04_as_mAP_432.pt.part").write_bytes(data[:1_000_000])  # an interrupted download
    (path,) = checkpoints.fetch_all(["mn04_as"], tmp_path, progress=False)
    assert path == tmp_path / "mn04_as_mAP_432.pt" and path.read_bytes() == data  # the real sha256 checked
    assert server.requests == [("/releases/mn04_as_mAP_432.pt", "bytes=1000000-")]
    checkpoints.fetch_all(["mn04_as"], tmp_path, progress=False)
    assert len(server.requests) == 1  # complete and verified: nothing downloaded again

    server.files["/releases/mn04_as_mAP_432.pt"] = data[:-1] + bytes([data[-1] ^ 1])  # same size
    with pytest.raises(ChecksumError, match="sha256 is .*, expected 899a8c62"):
        checkpoints.fetch_all(["mn04_as"], tmp_path / "bad", progress=False)


def test_a_release_link_that_sends_a_web_page_is_refused(server, tmp_path, monkeypatch):
    server.files["/v1/dcase2026_nabeats_seed1.ckpt"] = b"<!DOCTYPE html><html>Sign in</html>"
    monkeypatch.setattr(
        nabeats, "RELEASES", {"dcase2026_nabeats_seed1": f"{server.base}/v1/dcase2026_nabeats_seed1.ckpt"}
    )
    monkeypatch.setattr(nabeats, "BASE_URL", f"{server.base}/v1/BEATs_iter3.pt")
    server.files["/v1/BEATs_iter3.pt"] = b"\x80\x02 base weights"
    with pytest.raises(DownloadError, match="sent a web page .*removed"):
        checkpoints.fetch_all(["dcase2026_nabeats_seed1"], tmp_path, progress=False)
    assert not (tmp_path / "dcase2026_nabeats_seed1.ckpt").exists()
    assert (tmp_path / "BEATs_iter3.pt").is_file()  # the base comes with the release, fetched first


def _hub(server, repo: str, files: dict[str, bytes], commit: str = "c0ffee" * 6 + "abcd") -> None:
    """The two Hugging Face Hub endpoints fetch uses: the file list (with LFS sha256) and resolve/."""
    siblings = [{"rfilename": ".gitattributes", "size": 10}]
    for name, body in files.items():
        entry = {"rfilename": name, "size": len(body)}
        if name.endswith((".safetensors", ".bin")):
            entry["lfs"] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        siblings.append(entry)
        server.files[f"/{repo}/resolve/{commit}/{name}"] = body
    server.files[f"/api/models/{repo}/revision/main"] = json.dumps(
        {"sha": commit, "siblings": siblings}
    ).encode()


def test_a_hugging_face_repository_is_fetched_into_a_folder_the_loader_reads(
    server, tmp_path, backbone_fixtures, audio
):
    """FISHER-small as its Hugging Face repository publishes it (config.json + model.safetensors under a
    wrapper's 'model.' prefix; a pickle copy that is not downloaded twice), served by a local hub."""
    release = torch.load(backbone_fixtures / "fisher.pt", weights_only=True)
    fields = {**release["cfg"]["model"], "architectures": ["FISHERModel"], "model_type": "fisher"}
    save_file({f"model.{k}": v.contiguous() for k, v in release["model"].items()}, str(tmp_path / "w"))
    files = {
        "config.json": json.dumps(fields).encode(),
        "model.safetensors": (tmp_path / "w").read_bytes(),
        "pytorch_model.bin": b"the same weights as a pickle",
        "README.md": b"# FISHER",
    }
    _hub(server, "jiangab/FISHER-small-0723", files)
    folder = checkpoints.fetch_release(
        "FISHER-small-0723", tmp_path / "ckpt", progress=False, endpoint=server.base
    )
    assert folder == tmp_path / "ckpt" / "FISHER-small-0723"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = backbones.load("fisher", folder).eval()
    reference = backbones.load("fisher", backbone_fixtures / "fisher.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(audio["a"][None])[0], reference(audio["a"][None])[0], rtol=0, atol=0
        )

    files["model.safetensors"] = files["model.safetensors"][:-4] + b"    "  # the listed sha256 no longer fits
    _hub(server, "jiangab/FISHER-tiny-0723", {**files})
    server.files["/jiangab/FISHER-tiny-0723/resolve/" + "c0ffee" * 6 + "abcd/model.safetensors"] = (
        files["model.safetensors"][:-1] + b"!"
    )
    with pytest.raises(ChecksumError, match="model.safetensors .*sha256"):
        checkpoints.fetch_release("FISHER-tiny-0723", tmp_path / "ckpt", progress=False, endpoint=server.base)


def test_the_command_lists_fetches_and_says_what_to_do_for_a_share_page(
    server, tmp_path, monkeypatch, capsys
):
    assert cli.main(["checkpoints", "--backbone", "beats", "--names"]) == 0
    assert capsys.readouterr().out.split() == [
        "BEATs_iter3",
        "BEATs_iter3_plus_AS2M",
        "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2",
    ]
    assert cli.main(["checkpoints", "fetch", "BEATs_iter3_plus_AS2M", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no direct download link" in err and "OneDrive" in err and "github.com/microsoft/unilm" in err
    assert "weights_only" not in err and not list(tmp_path.iterdir())

    monkeypatch.setattr(nabeats, "BASE_URL", f"{server.base}/v1/BEATs_iter3.pt")
    server.files["/v1/BEATs_iter3.pt"] = b"\x80\x02 base weights"
    assert cli.main(["checkpoints", "fetch", "beats_iter3", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "BEATs_iter3.pt")
    assert cli.main(["checkpoints", "fetch", "nope", str(tmp_path)]) == 2
    assert "unknown checkpoint 'nope'" in capsys.readouterr().err
    server.files.pop("/v1/BEATs_iter3.pt")
    assert cli.main(["checkpoints", "fetch", "BEATs_iter3", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_loading_a_share_link_says_it_is_a_web_page_and_what_to_do(server, tmp_path, monkeypatch):
    """A OneDrive-style share link given as the checkpoint: the page is named as such, never unpickled,
    never with advice to turn weights_only off, and not kept in the cache to fail again."""
    from kit.backbones import CheckpointError, loading

    server.files["/share/BEATs_iter3_plus_AS2M.pt"] = b"<!DOCTYPE html><html><title>OneDrive</title></html>"
    monkeypatch.setattr(loading, "DEFAULT_CACHE", tmp_path)
    with pytest.raises(CheckpointError, match="is a web page \\(HTML\\), not a BEATs checkpoint") as info:
        backbones.load("beats", f"{server.base}/share/BEATs_iter3_plus_AS2M.pt", cache_dir=tmp_path)
    assert "weights_only" not in str(info.value) and "dcase-kit checkpoints" in str(info.value)
    assert not (tmp_path / "urls" / "BEATs_iter3_plus_AS2M.pt").exists()
