import hashlib
import http.server
import io
import json
import re
import socket
import threading
import urllib.parse
import zipfile

import numpy as np
import pytest

from kit.download import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    archives,
    download,
    fetch,
    file_digest,
    main,
    unpack,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (URL path -> bytes), honouring ``Range: bytes=N-`` unless told not to."""

    def do_GET(self):
        server = self.server
        path = urllib.parse.urlsplit(self.path).path
        requested_range = self.headers.get("Range")
        server.requests.append((path, requested_range))
        body = server.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if requested_range and not server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested_range).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if server.cut_after is not None:  # announce everything, send a little, hang up (once)
            payload, server.cut_after = payload[: server.cut_after], None
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


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


@pytest.fixture
def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return port  # nothing listens there any more: connections are refused


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def _official_members(machine="fan", prefix="", splits=("train", "test"), seed=0) -> dict[str, bytes]:
    """Members like an official archive: ``<machine>/train``, ``<machine>/test``, the attributes csv."""
    rng = np.random.default_rng(seed)
    members = {}
    if "train" in splits:
        for domain in ("source", "target"):
            name = f"{machine}/train/section_00_{domain}_train_normal_0000_spd_1.wav"
            members[prefix + name] = rng.bytes(20_000)
        members[f"{prefix}{machine}/attributes_00.csv"] = b"file_name,d1p,d1v\ntrain/x.wav,spd,1\n"
    if "test" in splits:
        members[f"{prefix}{machine}/test/section_00_source_test_anomaly_0000_spd_1.wav"] = rng.bytes(20_000)
    return members


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _record(files: dict[str, bytes], **checksums) -> bytes:
    """A Zenodo API record listing ``files``; ``checksums`` overrides a file's md5 (key: name)."""
    entries = [
        {"key": name, "size": len(data), "checksum": "md5:" + checksums.get(name, _md5(data))}
        for name, data in files.items()
    ]
    return json.dumps({"id": 1, "files": entries, "links": {"self": "unused"}}).encode()


def _tree(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_fetch_verifies_and_unpack_places_the_official_layout(server, tmp_path):
    members = _official_members("fan")
    data = _zip(members)
    server.files["/records/19336329/files/dev_fan.zip"] = data
    url = f"{server.base}/records/19336329/files/dev_fan.zip?download=1"
    target = tmp_path / "archives" / "dev_fan.zip"

    assert fetch(url, target, expected_size=len(data), md5=_md5(data), progress=False) == target
    assert target.read_bytes() == data
    assert not target.with_name("dev_fan.zip.part").exists()

    n_requests = len(server.requests)
    fetch(url, target, expected_size=len(data), md5=_md5(data).upper(), progress=False)
    assert len(server.requests) == n_requests  # complete and verified: not downloaded again

    machine_dir = unpack(target, tmp_path / "data", "dev", progress=False)
    assert machine_dir == tmp_path / "data" / "dev_data" / "raw" / "fan"
    assert _tree(machine_dir) == {name.removeprefix("fan/"): body for name, body in members.items()}
    assert [p.name for p in machine_dir.parent.iterdir()] == ["fan"]  # no staging folder left


def test_fetch_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    data = np.random.default_rng(1).bytes(100_000)
    server.files["/f.bin"] = data
    target = tmp_path / "f.bin"
    target.with_name("f.bin.part").write_bytes(data[:50_000])
    fetch(f"{server.base}/f.bin", target, expected_size=len(data), md5=_md5(data), progress=False)
    assert server.requests == [("/f.bin", "bytes=50000-")]
    assert target.read_bytes() == data


def test_fetch_resumes_after_a_dropped_connection(server, tmp_path):
    data = np.random.default_rng(2).bytes(100_000)
    server.files["/f.bin"] = data
    server.cut_after = 30_000
    target = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="interrupted after 30000 .*run again to resume"):
        fetch(f"{server.base}/f.bin", target, progress=False, chunk=4096)
    assert target.with_name("f.bin.part").stat().st_size == 30_000
    assert not target.exists()
    fetch(f"{server.base}/f.bin", target, md5=_md5(data), progress=False)
    assert server.requests[-1] == ("/f.bin", "bytes=30000-")
    assert target.read_bytes() == data


def test_fetch_restarts_when_the_server_ignores_range(server, tmp_path):
    data = np.random.default_rng(3).bytes(100_000)
    server.files["/f.bin"] = data
    server.ignore_range = True
    target = tmp_path / "f.bin"
    target.with_name("f.bin.part").write_bytes(b"x" * 40_000)  # appending to this would corrupt the file
    fetch(f"{server.base}/f.bin", target, expected_size=len(data), md5=_md5(data), progress=False)
    assert server.requests == [("/f.bin", "bytes=40000-")]
    assert target.read_bytes() == data


def test_fetch_handles_a_part_that_is_already_complete(server, tmp_path):
    data = b"0123456789" * 100
    server.files["/f.bin"] = data
    target = tmp_path / "f.bin"
    target.with_name("f.bin.part").write_bytes(data)
    fetch(f"{server.base}/f.bin", target, md5=_md5(data), progress=False)  # size unknown: the server says 416
    assert target.read_bytes() == data


def test_checksum_and_size_mismatches_raise_and_remove_the_bad_file(server, tmp_path):
    data = b"payload" * 1000
    server.files["/dev_fan.zip"] = data
    target = tmp_path / "dev_fan.zip"
    with pytest.raises(ChecksumError, match=rf"dev_fan\.zip.*md5 is {_md5(data)}, expected {'0' * 32}"):
        fetch(f"{server.base}/dev_fan.zip", target, md5="0" * 32, progress=False)
    with pytest.raises(
        ChecksumError, match=rf"dev_fan\.zip.*size is {len(data)} bytes, expected {len(data) + 1}"
    ):
        fetch(f"{server.base}/dev_fan.zip", target, expected_size=len(data) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_network_errors_are_clear(server, tmp_path, closed_port):
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:\d+/a\.zip.*offline"):
        fetch(f"http://127.0.0.1:{closed_port}/a.zip", tmp_path / "a.zip", progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.base}/missing.zip", tmp_path / "a.zip", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unpack_drops_a_top_level_folder_and_merges_the_evaluation_parts(tmp_path):
    train = _official_members("Sander", prefix="eval_data/raw/", splits=("train",))
    test = _official_members("Sander", prefix="eval_data_Sander_test/", splits=("test",), seed=1)
    (tmp_path / "train.zip").write_bytes(_zip(train))
    (tmp_path / "test.zip").write_bytes(_zip(test))
    root = tmp_path / "data"
    assert unpack(tmp_path / "train.zip", root, "eval", progress=False) == root / "eval_data/raw/Sander"
    unpack(tmp_path / "test.zip", root, "eval", progress=False)
    tree = _tree(root / "eval_data/raw/Sander")
    assert sorted(tree) == [
        "attributes_00.csv",
        "test/section_00_source_test_anomaly_0000_spd_1.wav",
        "train/section_00_source_train_normal_0000_spd_1.wav",
        "train/section_00_target_train_normal_0000_spd_1.wav",
    ]
    assert tree["attributes_00.csv"] == train["eval_data/raw/Sander/attributes_00.csv"]


def test_unpack_skips_what_is_in_place_and_restores_what_is_missing(tmp_path):
    (tmp_path / "a.zip").write_bytes(_zip(_official_members("fan")))
    machine_dir = unpack(tmp_path / "a.zip", tmp_path, progress=False)
    kept = machine_dir / "train" / "section_00_source_train_normal_0000_spd_1.wav"
    before = kept.stat().st_mtime_ns
    unpack(tmp_path / "a.zip", tmp_path, progress=False)
    assert kept.stat().st_mtime_ns == before  # nothing rewritten
    (machine_dir / "attributes_00.csv").unlink()
    unpack(tmp_path / "a.zip", tmp_path, progress=False)
    assert (machine_dir / "attributes_00.csv").is_file()


def test_unpack_is_atomic_when_a_member_is_corrupt(tmp_path):
    members = _official_members("fan")
    data = bytearray(_zip(members))
    payload = members["fan/test/section_00_source_test_anomaly_0000_spd_1.wav"]
    data[data.index(payload) + 100] ^= 0xFF  # the stored CRC no longer matches
    (tmp_path / "a.zip").write_bytes(bytes(data))
    raw = tmp_path / "dev_data" / "raw"
    (raw / ".unpack-a-killed").mkdir(parents=True)  # what a killed earlier run leaves behind
    with pytest.raises(ArchiveError, match="section_00_source_test_anomaly_0000_spd_1.wav' is corrupt"):
        unpack(tmp_path / "a.zip", tmp_path, progress=False)
    assert list(raw.iterdir()) == []  # no half-unpacked machine folder, no staging folder


@pytest.mark.parametrize("evil", ["../evil.txt", "fan/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_unpack_rejects_path_traversal(tmp_path, evil):
    members = _official_members("fan") | {evil: b"owned"}
    (tmp_path / "bad.zip").write_bytes(_zip(members))
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(evil))):
        unpack(tmp_path / "bad.zip", tmp_path / "data", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.zip"]


def test_unpack_rejects_what_is_not_an_official_archive(tmp_path):
    (tmp_path / "notzip.zip").write_bytes(b"this is no zip")
    with pytest.raises(ArchiveError, match="notzip.zip is not a valid zip"):
        unpack(tmp_path / "notzip.zip", tmp_path)
    (tmp_path / "other.zip").write_bytes(_zip({"readme.txt": b"hi", "data/x.wav": b"x"}))
    with pytest.raises(ArchiveError, match="not an official DCASE archive"):
        unpack(tmp_path / "other.zip", tmp_path)
    (tmp_path / "two.zip").write_bytes(_zip(_official_members("fan") | _official_members("valveEmu")))
    with pytest.raises(ArchiveError, match="several machine folders"):
        unpack(tmp_path / "two.zip", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        unpack(tmp_path / "missing.zip", tmp_path)
    with pytest.raises(ValueError, match="dataset must be 'dev' or 'eval'"):
        unpack(tmp_path / "two.zip", tmp_path, "test")


def test_archive_names_sizes_and_md5_come_from_the_record_api(server):
    record = {
        "dev_ToyCar_r2.zip": b"a",
        "dev_ToyCarEmu.zip": b"bb",
        "dev_fan_v1.1.zip": b"ccc",  # not the assumed name: found by its machine token
        "README.md": b"readme",
    }
    server.files["/api/records/19336329"] = _record(record)
    listed = archives(
        ["dev"],
        ["ToyCar", "ToyCarEmu", "fan"],
        api_base=f"{server.base}/api/records",
        files_base="https://mirror.example/records",
        log=None,
    )
    assert [(a.machine, a.name, a.size, a.md5) for a in listed] == [
        ("ToyCar", "dev_ToyCar_r2.zip", 1, _md5(b"a")),
        ("ToyCarEmu", "dev_ToyCarEmu.zip", 2, _md5(b"bb")),
        ("fan", "dev_fan_v1.1.zip", 3, _md5(b"ccc")),
    ]
    assert listed[0].url == "https://mirror.example/records/19336329/files/dev_ToyCar_r2.zip?download=1"
    with pytest.raises(DownloadError, match="record 19336329 .*no archive for valveEmu.*README.md"):
        archives(["dev"], ["valveEmu"], api_base=f"{server.base}/api/records", log=None)


def test_download_with_the_record_api_then_skips_on_a_rerun(server, tmp_path):
    data = _zip(_official_members("ToyDrone", splits=("test",)))
    server.files["/api/records/20437238"] = _record({"eval_data_ToyDrone_test.zip": data})
    server.files["/records/20437238/files/eval_data_ToyDrone_test.zip"] = data
    options = dict(
        datasets=["eval-test"],
        machines=["ToyDrone"],
        api_base=f"{server.base}/api/records",
        files_base=f"{server.base}/records",
        progress=False,
        log=None,
    )
    assert download(tmp_path, **options) == [tmp_path / "eval_data" / "raw" / "ToyDrone"]
    assert (tmp_path / "eval_data/raw/ToyDrone/test/section_00_source_test_anomaly_0000_spd_1.wav").is_file()
    # the zip is deleted once unpacked (a Drive cannot hold the data twice); the note stays
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == [
        "eval_data_ToyDrone_test.zip.unpacked.json"
    ]
    downloads = [path for path, _ in server.requests if path.startswith("/records/")]
    download(tmp_path, **options)
    assert [path for path, _ in server.requests if path.startswith("/records/")] == downloads

    server.files["/api/records/20437238"] = _record(
        {"eval_data_ToyDrone_test.zip": data}, **{"eval_data_ToyDrone_test.zip": "f" * 32}
    )
    with pytest.raises(ChecksumError, match=f"md5 is {_md5(data)}, expected {'f' * 32}"):
        download(tmp_path / "fresh", **options)


def test_download_falls_back_to_static_names_without_the_api(server, tmp_path, closed_port):
    data = _zip(_official_members("fan"))
    server.files["/records/19336329/files/dev_fan.zip"] = data
    messages = []
    folders = download(
        tmp_path,
        machines=["fan"],
        api_base=f"http://127.0.0.1:{closed_port}/api/records",
        files_base=f"{server.base}/records",
        progress=False,
        log=messages.append,
    )
    assert folders == [tmp_path / "dev_data" / "raw" / "fan"]
    assert any("not reachable" in m and "static file names" in m for m in messages)
    assert not (tmp_path / "archives" / "dev_fan.zip").exists()  # deleted by default
    # The note left beside the deleted zip lets a re-run skip it without downloading again.
    n_requests = len(server.requests)
    download(
        tmp_path, machines=["fan"], api_base=None, files_base=f"{server.base}/records", log=messages.append
    )
    assert len(server.requests) == n_requests
    assert "already unpacked" in messages[-1]


def test_bad_selections_are_rejected():
    with pytest.raises(ValueError, match="unknown data part"):
        archives(["devel"], api_base=None, log=None)
    with pytest.raises(ValueError, match=r"\['Sander'\] are not in the part\(s\) dev"):
        archives(["dev"], ["Sander"], api_base=None, log=None)


def test_command_line_downloads_both_evaluation_parts(server, tmp_path, capsys):
    for part, record, splits in [("train", 20151556, ("train",)), ("test", 20437238, ("test",))]:
        name = f"eval_data_Sander_{part}.zip"
        data = _zip(_official_members("Sander", splits=splits))
        server.files[f"/api/records/{record}"] = _record({name: data})
        server.files[f"/records/{record}/files/{name}"] = data
    mirror = ["--api-base", f"{server.base}/api/records", "--files-base", f"{server.base}/records"]
    args = [str(tmp_path), "--eval-train", "--eval-test", "--machines", "Sander", "--no-progress", *mirror]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval_data_Sander_train.zip" in out and "eval_data_Sander_test.zip" in out
    assert "done: 1 machine folder(s)" in out
    assert sorted(p.name for p in (tmp_path / "eval_data/raw/Sander").iterdir()) == [
        "attributes_00.csv",
        "test",
        "train",
    ]
    assert not list((tmp_path / "archives").glob("*.zip"))
    assert (
        main(
            [
                str(tmp_path / "kept"),
                "--eval-test",
                "--machines",
                "Sander",
                "--keep-zips",
                "--no-progress",
                *mirror,
            ]
        )
        == 0
    )
    assert (tmp_path / "kept" / "archives" / "eval_data_Sander_test.zip").is_file()
    assert main([str(tmp_path), "--machines", "Sander", "--no-progress", *mirror]) == 1
    assert "error: machine(s) ['Sander'] are not in the part(s) dev" in capsys.readouterr().err


def test_fetch_verifies_a_sha256(server, tmp_path):
    data = b"checkpoint bytes" * 100
    server.files["/ckpt.pt"] = data
    good = hashlib.sha256(data).hexdigest()
    target = fetch(f"{server.base}/ckpt.pt", tmp_path / "ckpt.pt", sha256=good.upper(), progress=False)
    assert target.read_bytes() == data and file_digest(target, "sha256") == good
    with pytest.raises(ChecksumError, match=f"sha256 is {good}, expected {'0' * 64}"):
        fetch(f"{server.base}/ckpt.pt", tmp_path / "other.pt", sha256="0" * 64, progress=False)
    assert not (tmp_path / "other.pt").exists() and not (tmp_path / "other.pt.part").exists()
