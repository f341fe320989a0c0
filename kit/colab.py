"""The notebooks' setup, one call from each notebook's setup cell, on a local checkout and on Colab.

The setup cell of every notebook finds the repository (or, on a fresh Colab runtime, clones it from
``repo_url``, :data:`REPO_URL` by default) and calls :func:`setup`, which

- changes into the repository (the notebooks' relative paths are relative to it);
- on Colab, installs the requirements Colab lacks and the package itself (``pip install -e``, so that
  ``!dcase-kit ...`` works in a cell), once: a second run, or a run after a runtime restart, finds them
  installed and installs nothing; and with ``drive_root`` mounts Google Drive (once);
- puts relative paths under ``drive_root`` (the run folder, the dataset root, checkpoints), so a run
  lives on Drive and survives the end of a Colab session;
- makes this runtime's data ready. Notebook 01 with ``local_copy=True`` copies the dataset from Drive
  to the runtime's local disk (``/content/data``; reading thousands of WAVs from Drive is slow) and
  records that in ``run_dir/run.yaml``. Every later notebook, even when it is the first thing a fresh
  runtime runs, makes the local copy again (resumable: files already there are skipped) and resolves
  ``run_dir/index.csv`` against this runtime's data root, so the index never points at files that are
  not there.

Each Colab notebook gets its own runtime, so every notebook must work as the first thing a runtime
runs; :func:`run_recipe` runs a whole recipe from one cell instead.

Only the standard library is imported at module level: this module runs before the requirements are
installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The URL the notebooks clone on Colab (their `repo_url` parameter holds the same; KIT_REPO_URL overrides).
REPO_URL = os.environ.get("KIT_REPO_URL", "https://github.com/dcase2026-kit/dcase2026-kit.git")
CLONE_NAME = "dcase2026-kit"  # the clone's folder in the runtime's local disk
DIST_NAME = "dcase2026-asd-kit"  # the package's name for pip
# The runtime's local disk (Colab: /content; KIT_LOCAL_ROOT moves it, e.g. for a test standing for Colab).
LOCAL_ROOT = Path(os.environ.get("KIT_LOCAL_ROOT", "/content"))
DRIVE_MOUNT = LOCAL_ROOT / "drive"
LOCAL_DATA = LOCAL_ROOT / "data"
COPY_NOTE = ".kit-local-copy.json"  # written in the local copy once it is complete
SKIPPED = ("archives",)  # top-level folders of a dataset root that are not data (the download's zips)
MANIFEST_KEY = "local_copy"  # run.yaml: where notebook 01's local copy came from


def in_colab() -> bool:
    return "google.colab" in sys.modules


def _say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# installing


def missing_requirements(requirements: Path | None = None) -> list[str]:
    """The lines of ``requirements.txt`` whose package is not installed (versions are not compared:
    Colab's own torch must not be replaced)."""
    missing = []
    for line in (requirements or REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
    return missing


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def install_missing(requirements: Path | None = None) -> list[str]:
    """``pip install`` what is missing; returns what was installed (nothing on a second run)."""
    missing = missing_requirements(requirements)
    if missing:
        _pip(*missing)
    return missing


def package_installed(root: str | os.PathLike = REPO) -> bool:
    """Whether this package is installed editable from ``root`` (so ``dcase-kit`` runs this checkout)."""
    wanted = Path(root).resolve().as_uri()
    # every copy of the metadata on sys.path: a checkout's own *.egg-info (no direct_url.json) comes first
    for distribution in importlib.metadata.distributions(name=DIST_NAME):
        try:
            url = json.loads(distribution.read_text("direct_url.json") or "{}").get("url", "")
        except ValueError:
            continue
        if url.rstrip("/") == wanted:
            return True
    return False


def install_package(root: str | os.PathLike = REPO) -> bool:
    """``pip install -e root --no-deps`` unless it is installed from there already; True when it ran.
    (``--no-deps``: the requirements are :func:`install_missing`'s, which leaves Colab's torch alone.)"""
    if package_installed(root):
        return False
    _pip("--no-deps", "-e", str(root))
    return True


def mount_drive() -> bool:
    """Mount Google Drive at ``/content/drive`` unless it is mounted; True when it mounted it."""
    if (DRIVE_MOUNT / "MyDrive").exists():
        return False
    from google.colab import drive  # only on Colab

    drive.mount(str(DRIVE_MOUNT))
    return True


# --------------------------------------------------------------------------------------------------
# paths and the local copy


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


def _data_files(source: Path) -> list[Path]:
    """Every file of a dataset root except the download's leftovers: ``archives/`` (zips and notes),
    unfinished ``.part`` files and hidden files (unpack staging folders)."""
    files = []
    for file in source.rglob("*"):
        rel = file.relative_to(source)
        if rel.parts[0] in SKIPPED or any(p.startswith(".") for p in rel.parts) or file.suffix == ".part":
            continue
        if file.is_file():
            files.append(file)
    return files


def _copy_one(file: Path, dest: Path) -> None:
    """Copy through a temporary name, so an interrupted copy never leaves a file that looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.copying")
    shutil.copy2(file, tmp)
    os.replace(tmp, dest)


def copy_to_local(
    source: str | os.PathLike,
    target: str | os.PathLike | None = None,
    *,
    trust_note: bool = False,
    workers: int = 8,
    progress: bool = True,
) -> str:
    """Copy a dataset root to local disk and return the copy's path. Resumable: files already copied
    (same size) are skipped; ``archives/`` and unfinished downloads are not copied. The copy holds a note
    naming its source (marked complete at the end): with ``trust_note`` a complete copy of ``source``
    is used without walking the source again (later notebooks; notebook 01 always checks every file,
    so data added to Drive since is copied), and a copy of another dataset is removed first, so two
    datasets never mix. Several files are copied at once (Drive reads are slow one by one)."""
    return str(_copy(source, target, trust_note=trust_note, workers=workers, progress=progress)[0])


def _copy(
    source, target, *, trust_note: bool = False, workers: int = 8, progress: bool = True
) -> tuple[Path, int]:
    """:func:`copy_to_local`, also returning how many files it copied."""
    from concurrent.futures import ThreadPoolExecutor

    source = Path(source)
    target = Path(target) if target is not None else LOCAL_DATA
    if not source.is_dir():
        raise FileNotFoundError(
            f"dataset root {source} not found (on Drive: is drive_root right, and was the dataset downloaded "
            "there with `dcase-kit download`?)"
        )
    from kit.files import write_text_atomic

    note = target / COPY_NOTE
    recorded = _read_note(note)
    if recorded.get("source") not in (None, str(source)):
        # a copy this module made of another dataset: it must not mix into this one's index
        _say(f"{target} holds a copy of {recorded['source']}: removing it to copy {source}")
        shutil.rmtree(target)
    elif trust_note and recorded.get("complete"):
        return target, 0
    write_text_atomic(note, json.dumps({"source": str(source), "complete": False}))
    pending = []
    for file in _data_files(source):
        dest = target / file.relative_to(source)
        if not dest.is_file() or dest.stat().st_size != file.stat().st_size:
            pending.append((file, dest))
    if pending:
        from tqdm.auto import tqdm

        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(
                total=len(pending),
                desc=f"copying {source.name} to {target}",
                unit="file",
                disable=not progress,
            ) as bar,
        ):
            for _ in pool.map(lambda pair: _copy_one(*pair), pending):
                bar.update()
    write_text_atomic(note, json.dumps({"source": str(source), "complete": True}))
    return target, len(pending)


def _read_note(note: Path) -> dict:
    try:
        recorded = json.loads(note.read_text(encoding="utf-8")) if note.is_file() else {}
    except ValueError:
        return {}  # unreadable: treated as no note (every file is checked)
    return recorded if isinstance(recorded, dict) else {}


def _record(run_dir: Path, source: str | None) -> None:
    """Write where notebook 01's local copy came from into ``run.yaml`` (None: no local copy): the path
    as given and relative to the run folder, so another runtime finds it wherever Drive is mounted."""
    from kit import manifest

    entry = None
    if source is not None:
        entry = {"source": str(source), "source_from_run": os.path.relpath(source, run_dir)}
    manifest.update(run_dir, **{MANIFEST_KEY: entry})


def _recorded_source(run_dir: Path, entry: dict) -> Path:
    relative = Path(os.path.normpath(run_dir / entry.get("source_from_run", "")))
    return relative if relative.is_dir() else Path(entry["source"])


def _sample(paths, n: int = 50):
    """Up to ``n`` evenly spaced entries (first and last included): enough to tell whether an index's
    root is here without a stat of every clip (slow on Drive)."""
    if len(paths) <= n:
        return paths
    step = (len(paths) - 1) / (n - 1)
    return paths.iloc[[round(i * step) for i in range(n)]]


def resolve_index(run_dir: str | os.PathLike, data_root: str | os.PathLike | None) -> bool:
    """Point ``run_dir/index.csv`` at ``data_root`` when its clips lie under another root (the one
    notebook 01 indexed, recorded in ``run.yaml``) that this runtime does not have; True when it
    rewrote the index (atomically, and ``data_root`` in ``run.yaml``). Clips missing from both roots
    are an error naming one and what to do."""
    from kit import data, manifest

    run_dir = Path(run_dir)
    index_file = run_dir / "index.csv"
    old = manifest.read(run_dir).get("data_root")
    if not index_file.is_file() or not old:
        return False
    index = data.load_index(index_file)
    paths = index["path"].astype(str)
    if paths.empty or _sample(paths).map(os.path.exists).all():
        return False  # the recorded root is here
    again = (
        "run notebook 01 again in this runtime (on Colab with local_copy=True: later notebooks then remake "
        "the local copy themselves)"
    )
    if data_root in (None, "embedded") or Path(data_root).absolute() == Path(old):
        raise FileNotFoundError(
            f"{index_file} lists clips under {old} (e.g. {_sample(paths).iloc[0]}), which this runtime does "
            f"not have: {again}"
        )
    prefix, new = str(Path(old)) + os.sep, str(Path(data_root).absolute()) + os.sep
    outside = ~paths.str.startswith(prefix)
    if outside.any():
        raise FileNotFoundError(
            f"{index_file} lists {paths[outside].iloc[0]}, outside its recorded data root {old}: {again}"
        )
    moved = new + paths.str.slice(len(prefix))
    missing = ~moved.map(os.path.exists)
    if missing.any():
        raise FileNotFoundError(
            f"{index_file} was built from {old}, which this runtime does not have, and "
            f"{moved[missing].iloc[0]} ({int(missing.sum())} clip(s) in all) is not under this runtime's "
            f"data root {data_root} either: {again}"
        )
    data.save_index(index.assign(path=moved), run_dir)
    manifest.update(run_dir, data_root=new.rstrip(os.sep))
    return True


# --------------------------------------------------------------------------------------------------
# the setup cell


def _prepare_runtime(root: Path, drive_root: str | None) -> list[str]:
    """Change into the repository; on Colab install what is missing and mount Drive. What it did."""
    os.chdir(root)
    done: list[str] = []
    if in_colab():
        installed = install_missing(root / "requirements.txt")
        if installed:
            done.append(f"installed {', '.join(installed)}")
        if install_package(root):
            done.append(f"installed the kit from {root} (the dcase-kit command)")
        if drive_root and mount_drive():
            done.append(f"mounted Google Drive at {DRIVE_MOUNT}")
    elif drive_root:
        _say(f"not on Colab: drive_root {drive_root} is used as a plain folder")
    return done


def setup(
    root: str | os.PathLike | None,
    run_dir: str,
    data_root: str,
    *,
    drive_root: str | None = None,
    local_copy: bool | None = None,
) -> tuple[Path, str]:
    """What every notebook's setup cell calls; returns ``(run_dir, data_root)`` as the notebook should
    use them. ``root``: the repository (the setup cell found or cloned it). ``local_copy``: notebook
    01's parameter (True: copy the dataset to local disk and record it; False: no copy); the other
    notebooks leave it None and follow what the run recorded. Safe to run any number of times: it
    prints what it did, or that everything was in place."""
    done = _prepare_runtime(Path(root or REPO).resolve(), drive_root)
    run_dir = Path(place(run_dir, drive_root))
    data_root = place(data_root, drive_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    data_root, more = _runtime_data(run_dir, data_root, local_copy)
    _say("setup: " + ("; ".join(done + more) if done + more else "everything in place, nothing to do"))
    return run_dir, data_root


def _runtime_data(run_dir: Path, data_root: str, local_copy: bool | None) -> tuple[str, list[str]]:
    """This runtime's data root, and what was done to make it ready."""
    if local_copy is not None:  # notebook 01 decides, and records its decision for the later notebooks
        if not local_copy or data_root == "embedded":
            _record(run_dir, None)
            return data_root, []
        if not Path(data_root).is_dir():  # before the download (the README's Colab step 2)
            _say(
                f"the dataset root {data_root} is not there yet: download the dataset there "
                f"(`!dcase-kit download {data_root} --dev --eval-train --eval-test`), then run this cell again"
            )
            return data_root, []
        target, copied = _copy(data_root, LOCAL_DATA)
        _record(run_dir, data_root)
        return str(target), [f"copied {copied} file(s) of {data_root} to {target}"] if copied else []
    from kit import manifest

    done = []
    entry = manifest.read(run_dir).get(MANIFEST_KEY)
    if entry:  # notebook 01 made a local copy: make it here too when this runtime lacks it
        source = _recorded_source(run_dir, entry)
        target, copied = _copy(source, LOCAL_DATA, trust_note=True)
        data_root = str(target)
        if copied:
            done.append(f"copied {copied} file(s) of {source} to {target} (this runtime's local copy)")
    if resolve_index(run_dir, data_root):
        done.append(f"pointed {run_dir / 'index.csv'} at {data_root}")
    return data_root, done


# --------------------------------------------------------------------------------------------------
# a whole recipe from one cell


def run_recipe(
    recipe: str,
    *,
    run_dir: str,
    data_root: str = "embedded",
    drive_root: str | None = None,
    local_copy: bool = False,
    checkpoints: dict[str, str] | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> Path:
    """Run a recipe's notebooks from one notebook cell (after the setup cell, or after cloning and
    ``sys.path.insert(0, clone)`` in a blank notebook): the set-up of :func:`setup`, then
    :func:`kit.pipeline.run_recipe` with the paths under ``drive_root``. ``local_copy`` makes notebook
    01 copy the dataset to local disk (and every later notebook find it). ``checkpoints``:
    ``{"BEATS_CHECKPOINT": "checkpoints/BEATs_iter3_plus_AS2M.pt", ...}``, relative paths under
    ``drive_root``. Run it again with the same arguments in a new session and the run resumes: finished
    models, embeddings and scores are kept, an interrupted training goes on from its last checkpoint."""
    for line in _prepare_runtime(REPO, drive_root):
        _say(line)
    run_path = Path(place(run_dir, drive_root))
    data_path = place(data_root, drive_root)
    if data_path != "embedded":
        data_path = str(Path(data_path).absolute())
    for variable, value in (checkpoints or {}).items():
        os.environ[variable] = place(value, drive_root, must_exist=True)
    extra = ["01.local_copy=true"] if local_copy and data_path != "embedded" else []
    from kit import pipeline

    return pipeline.run_recipe(recipe, data_path, run_path, overrides=[*overrides, *extra], only=only)
