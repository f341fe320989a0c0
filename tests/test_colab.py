"""kit.colab and the notebooks' setup cell: one call, idempotent, installs only what is missing, Drive
paths, the local copy (resumable, without archives/) and the index resolved in a new runtime.

``test_colab_walk_through`` simulates Colab without Colab, walking the README's Colab steps: a bare
folder stands for ``/content`` (``KIT_LOCAL_ROOT``), a ``sitecustomize`` puts a fake ``google.colab``
(its ``drive.mount`` links ``MyDrive`` to a folder that outlives every runtime) and a fake ``pip`` (it
records its calls and registers the editable install) on ``PYTHONPATH``; the repository is cloned from
a ``file://`` snapshot of this working tree by the setup cell itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kit import colab, data, manifest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text(encoding="utf-8"))["cells"]


def _setup_cell(notebook: Path) -> dict:
    (cell,) = [c for c in _cells(notebook) if "".join(c["source"]).startswith("# Setup")]
    return cell


def _runnable(source: str) -> str:
    return source.replace("%matplotlib inline", "")


# --------------------------------------------------------------------------------------------------
# the setup cell


def test_every_notebook_has_the_same_one_call_setup_cell_and_the_repository_url():
    cells = {nb.name: "".join(_setup_cell(nb)["source"]) for nb in NOTEBOOKS}
    assert len(cells) >= 8
    first = cells.pop("01_data_preparation.ipynb")
    assert len(set(cells.values())) == 1
    (other,) = set(cells.values())
    assert first.replace(", local_copy=local_copy)", ")") == other
    assert other.count("colab.setup(") == 1 and other.count("\n") < 20
    for notebook in NOTEBOOKS:
        assert _setup_cell(notebook)["id"] == f"{notebook.name[:2]}-cell-02"  # stable cell ids
        (params,) = [c for c in _cells(notebook) if "parameters" in c["metadata"].get("tags", [])]
        urls = re.findall(r'(?m)^repo_url = "([^"]+)"', "".join(params["source"]))
        assert urls == [colab.REPO_URL], f"{notebook.name}: repo_url must be kit.colab.REPO_URL"


def test_the_setup_cell_runs_twice_from_the_repository_and_from_notebooks(tmp_path, monkeypatch, capsys):
    cell = _runnable("".join(_setup_cell(REPO / "notebooks" / "07_train_cnn.ipynb")["source"]))
    before = sys.path.count(str(REPO))
    for cwd in (REPO, REPO / "notebooks", REPO):
        monkeypatch.chdir(cwd)
        namespace = {
            "repo_url": None,
            "drive_root": None,
            "data_root": "embedded",
            "run_dir": str(tmp_path / "run"),
        }
        exec(cell, namespace)
        assert (
            Path.cwd() == REPO and namespace["run_dir"] == tmp_path / "run" and namespace["run_dir"].is_dir()
        )
        assert namespace["data_root"] == "embedded"
        assert sys.path.count(str(REPO)) <= max(before, 1)  # not inserted again on every run
    assert capsys.readouterr().out.count("setup: everything in place, nothing to do") == 3


def test_the_setup_cell_asks_for_repo_url_when_the_code_is_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"repo_url": None, "drive_root": None, "data_root": "embedded", "run_dir": "runs/x"}
    with pytest.raises(RuntimeError, match="set repo_url"):
        exec(_runnable("".join(_setup_cell(REPO / "notebooks" / "09_scoring.ipynb")["source"])), namespace)


# --------------------------------------------------------------------------------------------------
# installing and Drive


def test_only_missing_requirements_are_installed(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.24\nsurely-not-installed-kit-pkg>=1.0  # note\ntorch>=2.2\n")
    assert colab.missing_requirements(requirements) == ["surely-not-installed-kit-pkg>=1.0"]
    calls = []
    monkeypatch.setattr(colab, "_pip", lambda *args: calls.append(args))
    assert colab.install_missing(requirements) == ["surely-not-installed-kit-pkg>=1.0"]
    assert calls == [("surely-not-installed-kit-pkg>=1.0",)]
    requirements.write_text("numpy\n")
    assert colab.install_missing(requirements) == [] and len(calls) == 1


def test_the_package_is_installed_editable_once_from_this_checkout(tmp_path, monkeypatch):
    """An editable install of this checkout: nothing to do; another clone gets one."""
    # what `pip install -e REPO` leaves on sys.path (CI installs only requirements.txt)
    site = tmp_path / "site"
    info = site / f"{colab.DIST_NAME.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {colab.DIST_NAME}\nVersion: 0.1\n")
    (info / "direct_url.json").write_text(
        json.dumps({"url": REPO.resolve().as_uri(), "dir_info": {"editable": True}})
    )
    monkeypatch.syspath_prepend(str(site))
    calls = []
    monkeypatch.setattr(colab, "_pip", lambda *args: calls.append(args))
    assert colab.package_installed(REPO) and not colab.install_package(REPO)
    assert not colab.package_installed(tmp_path) and colab.install_package(tmp_path)
    assert calls == [("--no-deps", "-e", str(tmp_path))]


def test_on_colab_drive_is_mounted_once_and_relative_paths_go_there(tmp_path, monkeypatch, capsys):
    mounted = []

    def mount(where):
        mounted.append(where)
        (tmp_path / "MyDrive").mkdir()

    fake = types.SimpleNamespace(drive=types.SimpleNamespace(mount=mount))
    monkeypatch.setitem(sys.modules, "google.colab", fake)
    monkeypatch.setattr(colab, "DRIVE_MOUNT", tmp_path)
    monkeypatch.setattr(colab, "install_missing", lambda requirements=None: [])
    monkeypatch.setattr(colab, "install_package", lambda root: False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "MyDrive" / "dcase"
    for _ in range(2):
        run_dir, data_root = colab.setup(REPO, "runs/a", "data/dcase2026", drive_root=str(root))
    assert mounted == [str(tmp_path)] and Path.cwd() == REPO
    out = capsys.readouterr().out
    assert f"setup: mounted Google Drive at {tmp_path}" in out and "nothing to do" in out
    assert (
        run_dir == root / "runs" / "a" and run_dir.is_dir() and data_root == str(root / "data" / "dcase2026")
    )
    assert colab.place("worstchan/EAT-base_epoch30_pretrain", root, must_exist=True) == (
        "worstchan/EAT-base_epoch30_pretrain"
    )
    (root / "ckpt").mkdir()
    (root / "ckpt" / "BEATs.pt").write_bytes(b"x")
    assert colab.place("ckpt/BEATs.pt", root, must_exist=True) == str(root / "ckpt" / "BEATs.pt")
    assert colab.place("/abs/x", root) == "/abs/x" and colab.place("embedded", root) == "embedded"


# --------------------------------------------------------------------------------------------------
# the local copy and the index


def _dataset(root: Path, n: int = 3) -> Path:
    train = root / "dev_data" / "raw" / "fan" / "train"
    train.mkdir(parents=True)
    for i in range(n):
        (train / f"{i}.wav").write_bytes(bytes(10 + i))
    (root / "archives").mkdir()
    (root / "archives" / "dev_fan.zip").write_bytes(b"zip")  # kept by --keep-zips: not data
    (root / "archives" / "dev_fan.zip.unpacked.json").write_text("{}")
    (root / "dev_data" / "raw" / "valve.zip.part").write_bytes(b"half")
    return root


def test_the_local_copy_resumes_and_leaves_out_archives(tmp_path):
    source = _dataset(tmp_path / "drive" / "data")
    target = tmp_path / "local"
    assert colab.copy_to_local(source, target, progress=False) == str(target)
    copied = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert copied == [
        colab.COPY_NOTE,
        "dev_data/raw/fan/train/0.wav",
        "dev_data/raw/fan/train/1.wav",
        "dev_data/raw/fan/train/2.wav",
    ]
    one = target / "dev_data" / "raw" / "fan" / "train" / "1.wav"
    stamp = one.stat().st_mtime_ns
    os.utime(one, ns=(stamp - 10**9, stamp - 10**9))
    (target / "dev_data" / "raw" / "fan" / "train" / "2.wav").write_bytes(b"cut")  # interrupted copy
    assert colab._copy(source, target, progress=False)[1] == 1  # only the damaged file again
    assert one.stat().st_mtime_ns == stamp - 10**9
    (source / "dev_data" / "raw" / "fan" / "train" / "3.wav").write_bytes(b"new")
    assert colab._copy(source, target, trust_note=True, progress=False)[1] == 0  # later notebooks trust it
    assert colab._copy(source, target, progress=False)[1] == 1  # notebook 01 checks every file
    with pytest.raises(FileNotFoundError, match="is drive_root right"):
        colab.copy_to_local(tmp_path / "nope", target)


def test_a_copy_of_another_dataset_is_replaced_not_mixed(tmp_path, capsys):
    first, second = _dataset(tmp_path / "a"), _dataset(tmp_path / "b", n=1)
    target = tmp_path / "local"
    colab.copy_to_local(first, target, progress=False)
    colab.copy_to_local(second, target, progress=False)
    assert f"holds a copy of {first}: removing it" in capsys.readouterr().out
    assert sorted(p.name for p in (target / "dev_data/raw/fan/train").iterdir()) == ["0.wav"]


def _indexed_run(tmp_path: Path, root: Path) -> Path:
    """A run folder whose index lists the clips of ``root`` (as notebook 01 leaves it)."""
    for name in (
        "section_00_source_train_normal_0000_a_1.wav",
        "section_00_source_test_anomaly_0000_a_1.wav",
    ):
        split = "train" if "_train_" in name else "test"
        path = root / "dev_data" / "raw" / "fan" / split / name
        path.parent.mkdir(parents=True, exist_ok=True)
        import numpy as np
        import soundfile as sf

        sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    run = tmp_path / "run"
    data.save_index(data.build_index(root, progress=False), run)
    manifest.update(run, data_root=str(root), index="index.csv")
    return run


def test_the_index_is_resolved_against_this_runtimes_data_root(tmp_path):
    old = tmp_path / "content1" / "data"
    run = _indexed_run(tmp_path, old)
    assert not colab.resolve_index(run, old)  # its own root: nothing to do
    new = tmp_path / "content2" / "data"
    shutil.copytree(old, new)
    assert not colab.resolve_index(run, new)  # the recorded root is still here
    shutil.rmtree(tmp_path / "content1")
    assert colab.resolve_index(run, new)
    index = data.load_index(run / "index.csv")
    assert all(p.startswith(str(new) + os.sep) and Path(p).is_file() for p in index["path"])
    assert manifest.read(run)["data_root"] == str(new)
    assert not colab.resolve_index(run, new)


def test_an_index_whose_clips_are_nowhere_says_what_to_do(tmp_path):
    old = tmp_path / "content1" / "data"
    run = _indexed_run(tmp_path, old)
    shutil.rmtree(tmp_path / "content1")
    with pytest.raises(FileNotFoundError, match=r"which this runtime does not have: run notebook 01 again"):
        colab.resolve_index(run, "embedded")
    (tmp_path / "other").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"2 clip\(s\) in all\) is not under this runtime's data root"
    ):
        colab.resolve_index(run, tmp_path / "other")


# --------------------------------------------------------------------------------------------------
# Colab without Colab: the README's steps, runtime by runtime


FAKE_COLAB = """
import os, sys, types
def _mount(where):
    os.makedirs(where, exist_ok=True)
    os.symlink(os.environ["FAKE_DRIVE"], os.path.join(where, "MyDrive"))
_colab = types.ModuleType("google.colab")
_colab.drive = types.SimpleNamespace(mount=_mount)
sys.modules["google.colab"] = _colab
"""
FAKE_PIP = """
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if "-e" in args:  # register the editable install the way pip does, in this runtime's site folder
    info = Path(__file__).resolve().parents[1] / "dcase2026_asd_kit-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: dcase2026-asd-kit\\nVersion: 0.1.0\\n")
    url = Path(args[args.index("-e") + 1]).resolve().as_uri()
    (info / "direct_url.json").write_text(json.dumps({"url": url, "dir_info": {"editable": True}}))
"""
TINY_TRAINING = {
    "backbone_config": "cpu",
    "head": "mean",
    "embed_dim": 16,
    "loss": "arcface",
    "label_scheme": "composite",
    "crop_seconds": 1.0,
    "steps": 4,
    "batch_size": 4,
    "lr": 1.0e-3,
    "warmup_steps": 1,
    "num_workers": 0,
}


def _readme_block(marker: str) -> str:
    """The README's fenced python block that contains ``marker`` (its Colab steps)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"README.md: expected one python block with {marker!r}"
    return textwrap.dedent(blocks[0])


def _snapshot(tmp_path: Path) -> str:
    """This working tree (tracked and new files) as a git repository: what a user clones."""
    src = tmp_path / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in listed:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *args], cwd=src, check=True)
    return src.as_uri()


class Runtime:
    """One Colab runtime: its own /content and its own installed packages; Drive outlives it."""

    def __init__(self, tmp_path: Path, number: int, drive: Path, substitutions: dict[str, str]):
        self.folder = tmp_path / f"runtime{number}"
        self.content = self.folder / "content"
        self.content.mkdir(parents=True)
        site = self.folder / "site"
        (site / "pip").mkdir(parents=True)
        (site / "sitecustomize.py").write_text(FAKE_COLAB)
        (site / "pip" / "__init__.py").write_text("")
        (site / "pip" / "__main__.py").write_text(FAKE_PIP)
        self.pip_log = self.folder / "pip.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("KIT_", "DATA_ROOT", "RUN_DIR"))},
            "PYTHONPATH": str(site),
            "KIT_LOCAL_ROOT": str(self.content),
            "FAKE_DRIVE": str(drive),
            "FAKE_PIP_LOG": str(self.pip_log),
            "OMP_NUM_THREADS": "1",
        }
        self.substitutions = {"/content": str(self.content), **substitutions}

    def local(self, text: str) -> str:
        """README text with this runtime's /content and the snapshot's URL in place of the real ones."""
        for old, new in self.substitutions.items():
            text = text.replace(old, new)
        return text

    def python(self, code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=self.content, env=self.env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def notebook(self, name: str, parameters: dict) -> str:
        out = self.folder / name
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "papermill",
                str(REPO / "notebooks" / name),
                str(out),
                "--cwd",
                str(self.content),
                "-y",
                yaml.safe_dump(parameters),
                "--log-output",
                "--no-progress-bar",
            ],
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    def pip_calls(self) -> list[list[str]]:
        return (
            [json.loads(line) for line in self.pip_log.read_text().splitlines()]
            if self.pip_log.exists()
            else []
        )


def _cell_as_python(cell: str) -> str:
    """A notebook cell's ``!command`` lines as shell commands (what IPython does)."""
    return "\n".join(
        f"import subprocess; subprocess.run({line.strip()[1:]!r}, shell=True)"
        if line.strip().startswith("!")
        else line
        for line in cell.splitlines()
    )


def test_colab_walk_through(tmp_path):
    """Colab, notebook by notebook and as a whole, each runtime fresh and only Drive kept."""
    from kit import synth

    drive = tmp_path / "gdrive"  # what MyDrive is: it outlives every runtime
    (drive / "dcase2026").mkdir(parents=True)
    url = _snapshot(tmp_path)
    substitutions = {colab.REPO_URL: url}

    # Step 2 in runtime 1: notebook 01's parameters from the README; its setup cell run twice
    parameters = {"repo_url": colab.REPO_URL}
    exec(_readme_block('drive_root = "/content/drive/MyDrive/dcase2026"'), {}, parameters)
    assert parameters["local_copy"] is True
    one = Runtime(tmp_path, 1, drive, substitutions)
    params = {k: one.local(v) if isinstance(v, str) else v for k, v in parameters.items()}
    cell = _runnable("".join(_setup_cell(REPO / "notebooks" / "01_data_preparation.ipynb")["source"]))
    run_cell = f"cell = {cell!r}\nnamespace = {params!r}\nexec(cell, namespace)\n"
    out = one.python(run_cell)  # before the download: it clones, installs, mounts and says what is missing
    assert "is not there yet: download the dataset there" in out
    assert "installed the kit" in out and "mounted Google Drive" in out

    # Step 3: the download (a tiny dataset stands for it, with the archives a --keep-zips run leaves),
    # then the setup cell copies the data, and copies nothing when run again
    synth.generate(drive / "dcase2026" / "data", scale=0.1, machines=["SynValve"], workers=1, progress=False)
    (drive / "dcase2026" / "data" / "archives").mkdir()
    (drive / "dcase2026" / "data" / "archives" / "dev_SynValve.zip").write_bytes(b"zip")
    files = [
        p for p in (drive / "dcase2026" / "data").rglob("*") if p.is_file() and "archives" not in p.parts
    ]
    first, second = one.python(run_cell + run_cell).split("setup: ")[1:]
    assert first.startswith(f"copied {len(files)} file(s)")
    assert second.startswith("everything in place, nothing to do")
    clone = one.content / "dcase2026-kit"
    assert (clone / ".git").is_dir() and (clone / "kit" / "colab.py").is_file()
    assert [call[-3:] for call in one.pip_calls()] == [["--no-deps", "-e", str(clone)]]  # once
    local = one.content / "data"
    assert (local / "dev_data").is_dir() and not (local / "archives").exists()  # the zips stay on Drive

    log = one.notebook("01_data_preparation.ipynb", params)  # Run all
    assert "setup: everything in place, nothing to do" in log
    run = drive / "dcase2026" / "runs" / "audiocc_1"
    index = pd.read_csv(run / "index.csv")
    assert len(index) == 18 and index["path"].str.startswith(str(local) + os.sep).all()
    shutil.rmtree(one.folder)  # the session ends: its disk and installs are gone

    # Step 5, notebook by notebook: notebook 07 first in a new runtime, the same drive_root and run_dir
    two = Runtime(tmp_path, 2, drive, substitutions)
    later = {k: two.local(v) if isinstance(v, str) else v for k, v in parameters.items() if k != "local_copy"}
    log = two.notebook("07_train_cnn.ipynb", {**later, "training": TINY_TRAINING})
    assert f"copied {len(files)} file(s)" in log and "(this runtime's local copy)" in log and "pointed" in log
    index = pd.read_csv(run / "index.csv")
    assert index["path"].str.startswith(str(two.content / "data") + os.sep).all()
    assert (run / "cnn" / "model.pt").is_file() and "cnn" in manifest.read(run)["branches"]
    trained = (run / "cnn" / "model.pt").stat().st_mtime_ns
    assert [call[-3:] for call in two.pip_calls()] == [
        ["--no-deps", "-e", str(two.content / "dcase2026-kit")]
    ]
    shutil.rmtree(two.folder)

    # Step 5, the whole recipe from one cell of a blank notebook, in a third runtime: the run resumes
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "description": "tiny",
                "steps": [
                    {"notebook": "01_data_preparation"},
                    {"notebook": "07_train_cnn", "params": {"training": TINY_TRAINING}},
                ],
            }
        )
    )
    three = Runtime(tmp_path, 3, drive, {**substitutions, '"audiocc_1",': f'"{recipe}",'})
    cell = three.local(_cell_as_python(_readme_block("colab.run_recipe(")))
    out = three.python(cell)
    assert "01_data_preparation done" in out and "07_train_cnn done" in out
    assert (run / "cnn" / "model.pt").stat().st_mtime_ns == trained  # trained once, kept across sessions
    index = pd.read_csv(run / "index.csv")
    assert index["path"].str.startswith(str(three.content / "data") + os.sep).all()
    assert (run / "notebooks" / "07_train_cnn.ipynb").is_file()
