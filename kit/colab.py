"""What the notebooks' setup cell does after it has found (or cloned) the repository.

Locally it only creates the run folder. On Google Colab it also:

- installs the requirements Colab lacks, once (Colab brings torch, torchaudio, numpy, pandas, ...;
  a second run, or a run after a runtime restart, finds them installed and installs nothing);
- with ``drive_root`` (e.g. ``/content/drive/MyDrive/dcase2026``), mounts Google Drive (once) and
  puts relative paths there: the run folder, the dataset root and the checkpoints, so a run survives
  the end of a Colab session and resumes from its last checkpoint;
- with ``local_copy``, copies the dataset from Drive to the runtime's local disk first (reading
  thousands of WAVs from Drive is slow; the copy is resumable: files already there are skipped).

Only the standard library is imported here: this module runs before the requirements are installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVE_MOUNT = Path("/content/drive")
LOCAL_DATA = Path("/content/data")


def in_colab() -> bool:
    return "google.colab" in sys.modules


def missing_requirements(requirements: Path = REPO / "requirements.txt") -> list[str]:
    """The lines of ``requirements.txt`` whose package is not installed (versions are not compared:
    Colab's own torch must not be replaced)."""
    missing = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
    return missing


def install_missing(requirements: Path = REPO / "requirements.txt") -> list[str]:
    """``pip install`` what is missing; returns what was installed (nothing on a second run)."""
    missing = missing_requirements(requirements)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    return missing


def mount_drive() -> None:
    if not (DRIVE_MOUNT / "MyDrive").exists():
        from google.colab import drive  # only on Colab

        drive.mount(str(DRIVE_MOUNT))


def place(
    path: str | os.PathLike | None, drive_root: str | os.PathLike | None, must_exist: bool = False
) -> str | None:
    """A relative path under ``drive_root`` (when given), else as it is. None, absolute paths, URLs and
    ``"embedded"`` stay as they are; with ``must_exist`` (checkpoints) only a path that exists under
    ``drive_root`` moves there, so a Hugging Face repo id (``owner/name``) stays a repo id."""
    if path is None or drive_root is None:
        return None if path is None else str(path)
    text = str(path)
    if text.startswith(("http://", "https://")) or Path(text).is_absolute() or text == "embedded":
        return text
    placed = Path(drive_root) / text
    return str(placed) if placed.exists() or not must_exist else text


def copy_to_local(source: str | os.PathLike, target: str | os.PathLike = LOCAL_DATA) -> str:
    """Copy a dataset folder to local disk, skipping files already copied (same size)."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise FileNotFoundError(f"dataset root {source} not found (on Drive: is drive_root right?)")
    for file in source.rglob("*"):
        if file.is_file():
            dest = target / file.relative_to(source)
            if not dest.exists() or dest.stat().st_size != file.stat().st_size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest)
    return str(target)


def setup(
    run_dir: str,
    data_root: str,
    *,
    drive_root: str | None = None,
    local_copy: bool = False,
) -> tuple[Path, str]:
    """Prepare a notebook's environment; returns ``(run_dir, data_root)`` as the notebook should use
    them (under ``drive_root`` on Colab when it is set; the dataset copied to local disk with
    ``local_copy``). Safe to run any number of times."""
    if in_colab():
        installed = install_missing()
        if installed:
            print(f"installed: {', '.join(installed)}")
        if drive_root:
            mount_drive()
    elif drive_root:
        print(f"not on Colab: drive_root {drive_root} is used as a plain folder")
    run_dir = place(run_dir, drive_root)
    data_root = place(data_root, drive_root)
    if local_copy and data_root != "embedded":
        data_root = copy_to_local(data_root)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, data_root
