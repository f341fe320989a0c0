"""Official DCASE 2026 Task 2 archives: the record table, a resumable verified download, unpacking.

Three Zenodo records hold the data:

- development set, record 19336329: ``dev_<machine>.zip`` per development machine (ToyCar as
  ``dev_ToyCar_r2.zip``);
- additional training data of the evaluation machines, record 20151556: ``eval_data_<machine>_train.zip``;
- evaluation test data, record 20437238: ``eval_data_<machine>_test.zip`` (assumed names).

When Zenodo's API answers, the file names, sizes and md5 checksums come from the record itself
(``GET <api>/<record>`` lists ``files: [{key, size, checksum: "md5:..."}]``); offline, the static names
above are used and only what the server sends can be checked.

:func:`fetch` streams one URL into ``<target>.part``, resumes an interrupted transfer with an HTTP
``Range`` request, verifies size and md5 (or sha256) and only then renames the part onto the target, so
a target that exists is always complete (``kit.checkpoints`` fetches the backbone releases with it). :func:`unpack` places an archive's ``<machine>/train``, ``<machine>/test``
and ``attributes_00.csv`` in the layout of the official baseline::

    <root>/dev_data/raw/<machine>/...      (development archives)
    <root>/eval_data/raw/<machine>/...     (both evaluation parts, merged)

:func:`download` does both for a selection of parts and machines. Each zip is deleted once it is
unpacked (the data would otherwise take twice its space, which a 15 GB Drive cannot hold;
``--keep-zips`` keeps them); a small ``<root>/archives/<zip>.unpacked.json`` note per archive lets a
re-run skip what is already in place without downloading it again. Command line::

    python -m kit.download ROOT [--dev] [--eval-train] [--eval-test] [--machines fan ToyCar ...] [--keep-zips]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from kit.files import write_text_atomic

ZENODO_API = "https://zenodo.org/api/records"
ZENODO_FILES = "https://zenodo.org/records"
USER_AGENT = "dcase2026-asd-kit (python urllib)"

DEV_MACHINES = ("ToyCar", "ToyCarEmu", "bearingEmu", "fan", "gearboxEmu", "sliderEmu", "valveEmu")
EVAL_MACHINES = ("ToyDrone", "ToothBrush", "SewingMachine", "BlowerDustCollector", "Sander")


@dataclass(frozen=True)
class Part:
    """One Zenodo record of the official data: where it unpacks and its archive per machine."""

    record: int
    dataset: str  # "dev" or "eval": the archives unpack into <root>/<dataset>_data/raw/
    split: str  # "train" or "test" when the record holds one split only, "" when both
    archives: dict[str, str]  # machine -> file name in the record


PARTS: dict[str, Part] = {
    "dev": Part(
        19336329, "dev", "", {m: f"dev_{m}.zip" for m in DEV_MACHINES} | {"ToyCar": "dev_ToyCar_r2.zip"}
    ),
    "eval-train": Part(20151556, "eval", "train", {m: f"eval_data_{m}_train.zip" for m in EVAL_MACHINES}),
    "eval-test": Part(20437238, "eval", "test", {m: f"eval_data_{m}_test.zip" for m in EVAL_MACHINES}),
}


@dataclass(frozen=True)
class Archive:
    """One archive to download; ``size``/``md5`` are None when the record could not be read."""

    part: str
    machine: str
    name: str
    url: str
    size: int | None = None
    md5: str | None = None

    @property
    def dataset(self) -> str:
        return PARTS[self.part].dataset


@dataclass(frozen=True)
class RemoteFile:
    """A file as a Zenodo record lists it."""

    name: str
    size: int | None
    md5: str | None


class DownloadError(OSError):
    """A download that failed: network unreachable, HTTP error, interrupted transfer, odd record."""


class ChecksumError(DownloadError):
    """A downloaded file whose size or md5 differs from the expected value."""


class ArchiveError(ValueError):
    """An archive that is not a valid zip or not laid out like an official DCASE archive."""


class UnsafeArchiveError(ArchiveError):
    """An archive member whose path would land outside the destination (absolute path or ``..``)."""


# ---------------------------------------------------------------------------------------------------
# fetch: one URL -> one verified file


def fetch(
    url: str,
    target: str | os.PathLike,
    *,
    expected_size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    chunk: int = 1 << 20,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``target`` and return ``target``.

    Bytes go to ``<target>.part``; a part left by an interrupted run is resumed with a ``Range``
    request (a server that ignores it and answers 200 is read from the first byte again). The size,
    md5 and sha256, when given, are checked before the part is renamed onto ``target``; a mismatch
    removes the part and raises :class:`ChecksumError`. An existing ``target`` that passes the checks is
    returned without any network access. Network failures raise :class:`DownloadError`; the part is
    kept so that the next call resumes.
    """
    target = Path(target)
    digests = {name: value.lower() for name, value in (("md5", md5), ("sha256", sha256)) if value}
    if target.exists():
        problem = _verify(target, expected_size, digests)
        if problem is None:
            return target
        warnings.warn(f"{target} exists but {problem}: downloading it again", stacklevel=2)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the whole file: it cannot be a prefix of it
        offset = 0
    if expected_size is None or offset < expected_size:
        _stream(url, part, offset, expected_size, progress=progress, chunk=chunk, timeout=timeout)
    problem = _verify(part, expected_size, digests)
    if problem is not None:
        part.unlink()
        raise ChecksumError(
            f"download of {target.name} from {url} failed verification: {problem}; the bad file was removed, "
            "run again to download it afresh"
        )
    os.replace(part, target)
    return target


def _verify(path: Path, expected_size: int | None, digests: dict[str, str]) -> str | None:
    """None when ``path`` matches the expected size and digests (``{"md5": hex, "sha256": hex}``;
    unknown values pass), else what differs."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"its size is {size} bytes, expected {expected_size}"
    for algorithm, expected in digests.items():
        digest = file_digest(path, algorithm)
        if digest != expected:
            return f"its {algorithm} is {digest}, expected {expected}"
    return None


def file_digest(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """The hex digest of a file (``md5``, ``sha256``, ...), read in blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


def _request(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _network_error(url: str, err: BaseException) -> DownloadError:
    if isinstance(err, urllib.error.HTTPError):
        return DownloadError(f"cannot download {url}: the server answered HTTP {err.code} {err.reason}")
    reason = getattr(err, "reason", None) or err
    return DownloadError(f"cannot reach {url}: {reason} (offline, or the server is down?)")


def _stream(
    url: str,
    part: Path,
    offset: int,
    expected_size: int | None,
    *,
    progress: bool,
    chunk: int,
    timeout: float,
) -> None:
    """Append the bytes of ``url`` from ``offset`` on to ``part`` (from 0 when the server restarts)."""
    try:
        response = _request(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # Range not satisfiable: the part holds the whole file already, or it is not a prefix of it.
            total = _content_range(err.headers.get("Content-Range", ""))[1]
            if total == offset:
                return
            part.unlink()
            return _stream(url, part, 0, expected_size, progress=progress, chunk=chunk, timeout=timeout)
        raise _network_error(url, err) from err
    except (OSError, http.client.HTTPException) as err:
        raise _network_error(url, err) from err

    if offset and response.status == 206:
        start = _content_range(response.headers.get("Content-Range", ""))[0]
        if start != offset:  # a range we did not ask for cannot be appended: start over
            response.close()
            part.unlink()
            return _stream(url, part, 0, expected_size, progress=progress, chunk=chunk, timeout=timeout)
    elif offset:
        offset = 0  # the server ignored the Range header and sends the whole file: start over
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None else None
        total = offset + length if length is not None else expected_size
        received = 0
        with (
            open(part, "ab" if offset else "wb") as file,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
            ) as bar,
        ):
            while True:
                try:
                    block = response.read(chunk)
                except (OSError, http.client.HTTPException) as err:
                    raise DownloadError(
                        f"download of {url} interrupted after {offset + received} bytes ({err!r}); "
                        "run again to resume"
                    ) from err
                if not block:
                    break
                file.write(block)
                received += len(block)
                bar.update(len(block))
    if length is not None and received < length:
        raise DownloadError(
            f"download of {url} interrupted after {offset + received} of {offset + length} bytes; "
            "run again to resume"
        )


def _content_range(header: str) -> tuple[int | None, int | None]:
    """``(start, total)`` from ``bytes START-END/TOTAL`` or ``bytes */TOTAL``; None where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


# ---------------------------------------------------------------------------------------------------
# the record table


def record_files(record: int, *, api_base: str = ZENODO_API, timeout: float = 30.0) -> list[RemoteFile]:
    """The files of a Zenodo record with their sizes and md5 checksums, from the Zenodo API."""
    url = f"{api_base.rstrip('/')}/{record}"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"}),
            timeout=timeout,
        ) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except (OSError, http.client.HTTPException) as err:
        raise _network_error(url, err) from err
    except ValueError as err:
        raise DownloadError(f"{url} did not return JSON: {err}") from err
    entries = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "key" in e for e in entries):
        raise DownloadError(f"{url} returned JSON without a 'files' list of {{key, size, checksum}} entries")
    files = []
    for entry in entries:
        algorithm, _, value = str(entry.get("checksum", "")).partition(":")
        size = entry.get("size")
        try:
            size = int(size) if size is not None else None
        except (TypeError, ValueError) as err:
            raise DownloadError(
                f"{url} lists {entry['key']!r} with a size that is no integer: {size!r}"
            ) from err
        files.append(
            RemoteFile(str(entry["key"]), size, value.lower() if algorithm == "md5" and value else None)
        )
    return files


def _pick(part_name: str, machine: str, files: Sequence[RemoteFile]) -> RemoteFile:
    """The record's archive for ``machine``: a zip whose ``_``-separated name contains the machine name
    (so ``ToyCar`` does not match ``dev_ToyCarEmu.zip``), preferring the expected name."""
    part = PARTS[part_name]
    candidates = [
        f for f in files if f.name.endswith(".zip") and machine in f.name[: -len(".zip")].split("_")
    ]
    exact = [f for f in candidates if f.name == part.archives[machine]]
    if exact:
        return exact[0]
    if len(candidates) > 1 and part.split:
        candidates = [f for f in candidates if part.split in f.name[: -len(".zip")].split("_")] or candidates
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(f.name for f in files) or "none"
    what = "no archive" if not candidates else "several archives"
    raise DownloadError(
        f"Zenodo record {part.record} ({part_name}) lists {what} for {machine}; its files: {names}"
    )


def archives(
    datasets: Iterable[str] = ("dev",),
    machines: Iterable[str] | None = None,
    *,
    api_base: str | None = ZENODO_API,
    files_base: str = ZENODO_FILES,
    log: Callable[[str], None] | None = print,
) -> list[Archive]:
    """The archives of the chosen parts (``"dev"``, ``"eval-train"``, ``"eval-test"``) and machines.

    Names, sizes and md5 come from each record through the Zenodo API at ``api_base``; when it cannot
    be reached (or ``api_base`` is None) the static names are used without size or md5.
    """
    datasets = list(datasets)
    unknown = [d for d in datasets if d not in PARTS]
    if unknown or not datasets:
        raise ValueError(f"unknown data part(s) {unknown or datasets}: expected some of {', '.join(PARTS)}")
    offered = {m for d in datasets for m in PARTS[d].archives}
    wanted = None if machines is None else list(machines)
    if wanted is not None:
        missing = [m for m in wanted if m not in offered]
        if missing or not wanted:
            raise ValueError(
                f"machine(s) {missing or wanted} are not in the part(s) {', '.join(datasets)}: "
                f"expected some of {', '.join(sorted(offered))}"
            )
    say = log or (lambda message: None)
    result = []
    for part_name in datasets:
        part = PARTS[part_name]
        selected = [m for m in part.archives if wanted is None or m in wanted]
        if not selected:
            continue
        remote = None
        if api_base is not None:
            try:
                remote = record_files(part.record, api_base=api_base)
            except DownloadError as err:
                say(
                    f"Zenodo API not reachable for record {part.record} ({err}); "
                    "using the static file names, sizes and md5 unknown"
                )
        for machine in selected:
            found = _pick(part_name, machine, remote) if remote is not None else None
            name = found.name if found else part.archives[machine]
            url = f"{files_base.rstrip('/')}/{part.record}/files/{urllib.parse.quote(name)}?download=1"
            size, md5 = (found.size, found.md5) if found else (None, None)
            result.append(Archive(part_name, machine, name, url, size, md5))
    return result


# ---------------------------------------------------------------------------------------------------
# unpack: one zip -> <root>/<dataset>_data/raw/<machine>/


def _member_parts(name: str, zip_path: Path) -> tuple[str, ...]:
    """The path components of a member, refusing any that could leave the destination folder."""
    normalised = name.replace("\\", "/")
    parts = tuple(p for p in normalised.split("/") if p not in ("", "."))
    if normalised.startswith("/") or re.match(r"^[A-Za-z]:", normalised) or ".." in parts:
        raise UnsafeArchiveError(
            f"{zip_path} holds member {name!r}, whose path would land outside the destination folder; "
            "refusing it"
        )
    return parts


def _layout(
    archive: zipfile.ZipFile, zip_path: Path
) -> tuple[str, list[tuple[zipfile.ZipInfo, PurePosixPath]]]:
    """The machine an archive holds and, per file, its path below the machine folder.

    The machine folder is the component just before ``train``/``test``, or the folder of an
    ``attributes_*.csv``; anything above it (``dev_data/raw/`` or another top-level folder) is dropped.
    """
    plan, prefixes, ignored = [], set(), []
    for info in archive.infolist():
        parts = _member_parts(info.filename, zip_path)
        if info.is_dir() or not parts:
            continue
        if parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
            continue
        folders = parts[:-1]
        anchor = next((i for i, p in enumerate(folders) if p in ("train", "test")), None)
        if anchor is None and re.fullmatch(r"attributes_\d+\.csv", parts[-1]):
            anchor = len(parts) - 1
        if anchor is None:
            ignored.append(info.filename)
            continue
        if anchor == 0:
            raise ArchiveError(f"{zip_path}: member {info.filename!r} is not inside a <machine>/ folder")
        prefixes.add(parts[:anchor])
        plan.append((info, PurePosixPath(*parts[anchor:])))
    if not plan:
        sample = ", ".join(i.filename for i in archive.infolist()[:5]) or "nothing"
        raise ArchiveError(
            f"{zip_path} holds no <machine>/train/, <machine>/test/ or attributes csv, so it is not an "
            f"official DCASE archive (first members: {sample})"
        )
    if len(prefixes) > 1:
        folders = ", ".join("/".join(p) for p in sorted(prefixes))
        raise ArchiveError(f"{zip_path} holds several machine folders ({folders}); expected one per archive")
    if ignored:
        warnings.warn(
            f"{zip_path}: ignoring {len(ignored)} member(s) outside the machine layout, e.g. {ignored[0]!r}",
            stacklevel=3,
        )
    return prefixes.pop()[-1], plan


def _open_zip(zip_path: Path) -> zipfile.ZipFile:
    if not zip_path.is_file():
        raise FileNotFoundError(f"archive not found: {zip_path}")
    try:
        return zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as err:
        raise ArchiveError(
            f"{zip_path} is not a valid zip archive ({err}); delete it and download again"
        ) from err


def _machine_root(root: str | os.PathLike, dataset: str) -> Path:
    if dataset not in ("dev", "eval"):
        raise ValueError(f"dataset must be 'dev' or 'eval', got {dataset!r}")
    return Path(root) / f"{dataset}_data" / "raw"


def unpacked_files(
    zip_path: str | os.PathLike, root: str | os.PathLike, dataset: str = "dev"
) -> dict[Path, int]:
    """Where :func:`unpack` puts each file of an archive, with its size in bytes."""
    zip_path = Path(zip_path)
    with _open_zip(zip_path) as archive:
        machine, plan = _layout(archive, zip_path)
    machine_dir = _machine_root(root, dataset) / machine
    return {machine_dir.joinpath(*rel.parts): info.file_size for info, rel in plan}


def _in_place(files: dict[Path, int]) -> bool:
    return all(path.is_file() and path.stat().st_size == size for path, size in files.items())


def unpack(
    zip_path: str | os.PathLike, root: str | os.PathLike, dataset: str = "dev", *, progress: bool = True
) -> Path:
    """Unpack an official archive into ``<root>/<dataset>_data/raw/<machine>/`` and return that folder.

    Members are checked first (no absolute paths, no ``..``), then extracted into a temporary folder
    beside the destination and moved into place, so an interrupted unpack leaves nothing half
    written. An archive whose files are all in place already (same sizes) is skipped. Folders that
    exist (``eval_data/raw/<machine>/`` receives both evaluation parts) are merged; a file the archive
    holds replaces an older copy.
    """
    zip_path = Path(zip_path)
    raw = _machine_root(root, dataset)
    with _open_zip(zip_path) as archive:
        machine, plan = _layout(archive, zip_path)
        machine_dir = raw / machine
        if _in_place({machine_dir.joinpath(*rel.parts): info.file_size for info, rel in plan}):
            return machine_dir
        raw.mkdir(parents=True, exist_ok=True)
        for stale in raw.glob(f".unpack-{zip_path.stem}-*"):  # left by a killed run of this very archive
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".unpack-{zip_path.stem}-", dir=raw))
        # mkdtemp's folder is private (0700); the folder moved into place is created normally instead.
        content = staging / machine
        content.mkdir()
        try:
            for info, rel in tqdm(plan, desc=f"unpack {zip_path.name}", unit="file", disable=not progress):
                destination = content.joinpath(*rel.parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with archive.open(info) as source, open(destination, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                except (zipfile.BadZipFile, EOFError, zlib.error) as err:
                    raise ArchiveError(f"{zip_path}: member {info.filename!r} is corrupt ({err})") from err
            _merge(content, machine_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return machine_dir


def _merge(source: Path, destination: Path) -> None:
    """Move the tree ``source`` onto ``destination`` with renames (atomic per entry)."""
    if not destination.exists():
        os.replace(source, destination)
        return
    if not destination.is_dir():
        raise ArchiveError(f"cannot unpack into {destination}: a file of that name is in the way")
    for entry in source.iterdir():
        target = destination / entry.name
        if entry.is_dir():
            _merge(entry, target)
        elif target.is_dir():
            raise ArchiveError(f"cannot unpack file {entry.name} over the folder {target}")
        else:
            os.replace(entry, target)


# ---------------------------------------------------------------------------------------------------
# download: the whole pipeline


def download(
    root: str | os.PathLike,
    *,
    datasets: Iterable[str] = ("dev",),
    machines: Iterable[str] | None = None,
    keep_zips: bool = False,
    progress: bool = True,
    api_base: str | None = ZENODO_API,
    files_base: str = ZENODO_FILES,
    log: Callable[[str], None] | None = print,
) -> list[Path]:
    """Download and unpack the chosen parts and machines under ``root``; return the machine folders.

    Zips are downloaded into ``<root>/archives/`` and deleted once unpacked (kept with
    ``keep_zips=True``); an ``<zip>.unpacked.json`` note there lists the files each archive put in place,
    so a re-run skips an archive whose files are all there and whose record checksum has not changed,
    whether or not its zip was kept.
    """
    root = Path(root)
    say = log or (lambda message: None)
    zip_dir = root / "archives"
    folders: list[Path] = []
    for archive in archives(datasets, machines, api_base=api_base, files_base=files_base, log=log):
        note = zip_dir / f"{archive.name}.unpacked.json"
        machine_dir = _unpacked_before(note, archive, root)
        if machine_dir is not None:
            say(f"{archive.name}: already unpacked in {machine_dir}")
        else:
            zip_path = zip_dir / archive.name
            size_text = f"{archive.size / 2**20:.1f} MiB" if archive.size is not None else "size unknown"
            say(f"{archive.name} ({size_text}): {archive.url} -> {zip_path}")
            fetch(archive.url, zip_path, expected_size=archive.size, md5=archive.md5, progress=progress)
            files = unpacked_files(zip_path, root, archive.dataset)
            machine_dir = unpack(zip_path, root, archive.dataset, progress=progress)
            write_text_atomic(
                note,
                json.dumps(
                    {
                        "md5": archive.md5 or _md5(zip_path),
                        "machine_dir": machine_dir.relative_to(root).as_posix(),
                        "files": {path.relative_to(root).as_posix(): size for path, size in files.items()},
                    }
                ),
            )
            if not keep_zips:
                zip_path.unlink()
            say(f"{archive.name}: unpacked into {machine_dir}")
        if machine_dir.name != archive.machine:
            warnings.warn(
                f"{archive.name} holds the folder {machine_dir.name!r}, not {archive.machine!r}", stacklevel=2
            )
        if machine_dir not in folders:
            folders.append(machine_dir)
    return folders


def _unpacked_before(note: Path, archive: Archive, root: Path) -> Path | None:
    """The machine folder when ``note`` shows this very archive unpacked and its files still in place.
    Paths in the note are relative to ``root``, so the data root can be moved."""
    if not note.is_file():
        return None
    try:
        recorded = json.loads(note.read_text(encoding="utf-8"))
        files = {root / path: int(size) for path, size in recorded["files"].items()}
        machine_dir, md5 = root / recorded["machine_dir"], recorded["md5"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable note: unpack again, which rewrites it
    if archive.md5 is not None and md5 != archive.md5:
        return None  # the record now holds another version of this archive
    return machine_dir if _in_place(files) else None


# ---------------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None, prog: str = "python -m kit.download") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Download the official DCASE 2026 Task 2 archives from Zenodo and unpack them into "
        "ROOT/dev_data/raw/<machine>/ and ROOT/eval_data/raw/<machine>/ (the official baseline's layout). "
        "Interrupted downloads resume; re-runs skip what is in place.",
    )
    parser.add_argument("root", type=Path, help="data root, e.g. data/dcase2026t2")
    parser.add_argument(
        "--dev",
        action="store_true",
        help=f"development set (record {PARTS['dev'].record}); the default when no part is named",
    )
    parser.add_argument(
        "--eval-train",
        action="store_true",
        help=f"additional training data of the evaluation machines (record {PARTS['eval-train'].record})",
    )
    parser.add_argument(
        "--eval-test", action="store_true", help=f"evaluation test data (record {PARTS['eval-test'].record})"
    )
    parser.add_argument(
        "--machines", nargs="+", metavar="MACHINE", help="only these machine types (default: all)"
    )
    parser.add_argument(
        "--keep-zips",
        action="store_true",
        help="keep each zip in ROOT/archives/ after unpacking (default: delete it, the data would "
        "otherwise take twice its space)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--api-base", default=ZENODO_API, help="Zenodo records API (for a mirror)")
    parser.add_argument("--files-base", default=ZENODO_FILES, help="Zenodo file URLs' base (for a mirror)")
    args = parser.parse_args(argv)
    parts = [
        name
        for name, flag in [("dev", args.dev), ("eval-train", args.eval_train), ("eval-test", args.eval_test)]
        if flag
    ] or ["dev"]
    try:
        folders = download(
            args.root,
            datasets=parts,
            machines=args.machines,
            keep_zips=args.keep_zips,
            progress=not args.no_progress,
            api_base=args.api_base,
            files_base=args.files_base,
        )
    except (OSError, ValueError) as err:  # DownloadError, ArchiveError, a bad option: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: {len(folders)} machine folder(s) under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
