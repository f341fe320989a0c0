"""Atomic file output and small path helpers shared by every stage.

Every artefact a run produces (index.csv, results.csv, embeddings, checkpoints, submission CSVs and
zips) is written to a temporary file in the destination folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    Works for files written by any library (``df.to_csv(tmp)``, ``np.save(tmp)``, ``torch.save``)
    and for folders (create ``tmp`` as a directory). On error the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # let the writer create it (file or folder)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# A dataset written by a tool (kit.synth, kit.mix) carries a JSON record of the parameters it was made
# with and whether it is complete: a second run with the same parameters resumes or returns at once.
def read_dataset_record(root: Path, name: str, tool: str, folders, legacy: str | None = None) -> dict | None:
    """The record ``root/name`` of a dataset written by ``tool`` (or its earlier name ``legacy``); None
    when there is none yet. A root that already holds one of ``folders`` without it is someone else's."""
    path = root / name
    if not path.exists() and legacy and (root / legacy).exists():
        path = root / legacy  # written before the record had its present name
    if not path.exists():
        if any((root / folder).exists() for folder in folders):
            raise FileExistsError(
                f"{root} already holds a dataset that {tool} did not write (no {name}); choose an empty folder"
            )
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete {root} and run {tool} again") from error


def start_dataset(
    root: Path, name: str, tool: str, folders, parameters: dict, legacy: str | None = None
) -> dict | None:
    """Begin (or resume) writing a ``tool`` dataset under ``root``: its finished record when a complete
    dataset with these ``parameters`` is there (nothing to do), else None after marking the dataset
    incomplete with these parameters. Other parameters in ``root`` are an error."""
    record = read_dataset_record(root, name, tool, folders, legacy)
    if record is not None:
        found = {key: record.get(key) for key in parameters}
        if found != parameters:
            changed = sorted(key for key in parameters if found[key] != parameters[key])
            raise FileExistsError(
                f"{root} holds a {tool} dataset made with other parameters ({', '.join(changed)} differ; see "
                f"{root / name}); delete it or choose another root"
            )
        if record.get("complete"):
            return record
    write_text_atomic(root / name, json.dumps({**parameters, "complete": False}, indent=2) + "\n")
    return None
