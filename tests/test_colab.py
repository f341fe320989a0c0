"""The notebooks' setup cell and kit.colab: idempotent, installs only what is missing, Drive paths."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from kit import colab

REPO = Path(__file__).resolve().parents[1]


def _setup_cell(notebook: str) -> str:
    cells = json.loads((REPO / "notebooks" / notebook).read_text())["cells"]
    source = "".join(cells[2]["source"])
    assert source.startswith("# Setup")
    return source.replace("%matplotlib inline", "")


def test_every_notebook_has_the_same_setup_cell():
    cells = {nb.name: _setup_cell(nb.name) for nb in sorted((REPO / "notebooks").glob("0*.ipynb"))}
    assert len(cells) >= 6
    others = {name: cell for name, cell in cells.items() if not name.startswith("01")}
    assert len(set(others.values())) == 1
    assert cells["01_data_preparation.ipynb"].replace(", local_copy=local_copy", "") == next(
        iter(others.values())
    )


def test_the_setup_cell_runs_twice_from_the_repository_and_from_notebooks(tmp_path, monkeypatch):
    before = sys.path.count(str(REPO))
    for cwd in (REPO, REPO / "notebooks", REPO):
        monkeypatch.chdir(cwd)
        namespace = {
            "repo_url": None,
            "drive_root": None,
            "data_root": "embedded",
            "run_dir": str(tmp_path / "run"),
        }
        exec(_setup_cell("02_finetune_beats.ipynb"), namespace)
        assert (
            Path.cwd() == REPO and namespace["run_dir"] == tmp_path / "run" and namespace["run_dir"].is_dir()
        )
        assert sys.path.count(str(REPO)) <= max(before, 1)  # not inserted again on every run


def test_the_setup_cell_asks_for_repo_url_when_the_code_is_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"repo_url": None, "drive_root": None, "data_root": "embedded", "run_dir": "runs/x"}
    with pytest.raises(RuntimeError, match="set repo_url"):
        exec(_setup_cell("09_scoring.ipynb"), namespace)


def test_only_missing_requirements_are_installed(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.24\nsurely-not-installed-kit-pkg>=1.0  # note\ntorch>=2.2\n")
    assert colab.missing_requirements(requirements) == ["surely-not-installed-kit-pkg>=1.0"]
    calls = []
    monkeypatch.setattr(colab.subprocess, "run", lambda args, check: calls.append(args))
    assert colab.install_missing(requirements) == ["surely-not-installed-kit-pkg>=1.0"]
    assert calls[0][-1] == "surely-not-installed-kit-pkg>=1.0" and "numpy>=1.24" not in calls[0]
    requirements.write_text("numpy\n")
    assert colab.install_missing(requirements) == [] and len(calls) == 1


def test_on_colab_drive_is_mounted_once_and_relative_paths_go_there(tmp_path, monkeypatch):
    mounted = []
    drive = types.SimpleNamespace(mount=lambda where: (mounted.append(where), (tmp_path / "MyDrive").mkdir()))
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=drive))
    monkeypatch.setitem(sys.modules, "google", types.SimpleNamespace(colab=sys.modules["google.colab"]))
    monkeypatch.setattr(colab, "DRIVE_MOUNT", tmp_path)
    monkeypatch.setattr(colab, "install_missing", lambda: [])
    root = tmp_path / "MyDrive" / "dcase"
    for _ in range(2):
        run_dir, data_root = colab.setup("runs/a", "data/dcase2026", drive_root=str(root))
    assert mounted == [str(tmp_path)]
    assert (
        run_dir == root / "runs" / "a" and run_dir.is_dir() and data_root == str(root / "data" / "dcase2026")
    )
    assert (
        colab.place("worstchan/EAT-base_epoch30_pretrain", root, must_exist=True)
        == "worstchan/EAT-base_epoch30_pretrain"
    )
    (root / "ckpt").mkdir()
    (root / "ckpt" / "BEATs.pt").write_bytes(b"x")
    assert colab.place("ckpt/BEATs.pt", root, must_exist=True) == str(root / "ckpt" / "BEATs.pt")
    assert colab.place("/abs/x", root) == "/abs/x" and colab.place("embedded", root) == "embedded"


def test_the_dataset_copy_to_local_disk_resumes(tmp_path):
    source = tmp_path / "drive" / "data"
    (source / "dev_data" / "raw" / "fan" / "train").mkdir(parents=True)
    for i in range(3):
        (source / "dev_data" / "raw" / "fan" / "train" / f"{i}.wav").write_bytes(bytes(10 + i))
    target = tmp_path / "local"
    assert colab.copy_to_local(source, target) == str(target)
    copied = target / "dev_data" / "raw" / "fan" / "train" / "1.wav"
    stamp = copied.stat().st_mtime_ns
    os.utime(copied, ns=(stamp - 10**9, stamp - 10**9))
    colab.copy_to_local(source, target)  # same size: skipped
    assert copied.stat().st_mtime_ns == stamp - 10**9
    with pytest.raises(FileNotFoundError, match="is drive_root right"):
        colab.copy_to_local(tmp_path / "nope", target)
