"""Where each official backbone checkpoint comes from, and a resumable, verified download of those
that have a direct link: ``dcase-kit checkpoints``.

One :class:`Release` per published file or repository: its backbone, what it is, where the official
file comes from, its size, how to get it and which recipes use it (with their environment variable).

- **direct**: Hugging Face repositories (EAT ``worstchan/...``, FISHER ``jiangab/...``) and GitHub
  release files (EfficientAT ``mn*_as``, MERL's NA-BEATs and the ``BEATs_iter3.pt`` they re-host).
  :func:`fetch` downloads them with :func:`kit.download.fetch`: ``.part`` files resumed with HTTP
  ``Range`` requests, sizes checked, sha256 checked where it is known (a Hugging Face repository lists
  the sha256 of each large file; the EfficientAT ``mn04_as`` file's is known here), a web page
  refused. A Hugging Face repository becomes the folder ``DIR/<repo name>/`` that the loaders read as
  it is (``config.json`` + weights).
- **by hand**: Microsoft's BEATs ``BEATs_iter3_plus_AS2M.pt`` and ``..._cpt2.pt`` are OneDrive share
  pages: a program that requests them gets an HTML page, not the file. The listing says what to do; a
  page saved in a checkpoint's place is named as such by :mod:`kit.backbones.loading`.

EfficientAT's and NA-BEATs' file names, URLs and sizes come from their backbone modules
(``RELEASES``), so they are written in one place.

    dcase-kit checkpoints                       every release, per backbone
    dcase-kit checkpoints --backbone fisher     one backbone
    dcase-kit checkpoints fetch FISHER-small-0723 checkpoints/
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kit.download import USER_AGENT, DownloadError, fetch

HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
BEATS_PAGE = "https://github.com/microsoft/unilm/tree/master/beats"
EAT_PAGE = "https://github.com/cwx-worst-one/EAT"
FISHER_PAGE = "https://github.com/jianganbai/FISHER"
EFFICIENTAT_PAGE = "https://github.com/fschmid56/EfficientAT/releases/tag/v0.0.1"
NABEATS_PAGE = "https://github.com/merlresearch/noise-aware-audio-ssl/releases/tag/v1.0.0"
# Known checksums of release files whose module does not list one (from the files themselves).
KNOWN_SHA256 = {"mn04_as_mAP_432.pt": "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"}
BEATS_BY_HAND = (
    "the official link is a OneDrive share page (a program gets an HTML page, not the file): open "
    f"{BEATS_PAGE}, follow the link of {{file}} in its table, press Download in the browser, then put the "
    "file where the run reads it (on Colab: upload it to Drive, e.g. MyDrive/dcase2026/checkpoints/) and "
    "pass that path"
)


@dataclass(frozen=True)
class Release:
    """One published checkpoint (a file or a Hugging Face repository)."""

    name: str  # what `checkpoints fetch` and the loaders take
    backbone: str  # kit.backbones name
    what: str
    source: str  # the page the official file comes from
    url: str | None = None  # a direct download link
    hf_repo: str | None = None  # a Hugging Face repository id
    size: int | None = None  # bytes, exact
    approx_mb: int | None = None  # float32 size from the parameter count, when the exact size is unknown
    sha256: str | None = None
    how: str = ""  # how to get it when there is no direct link
    use: str = ""  # which recipes use it, with their environment variable
    with_files: tuple[str, ...] = ()  # other releases fetched with it (NA-BEATs: its base BEATs file)

    @property
    def direct(self) -> bool:
        return bool(self.url or self.hf_repo)

    @property
    def file(self) -> str:
        """The file (or, for a Hugging Face repository, the folder) a fetch writes into DIR."""
        if self.hf_repo:
            return self.hf_repo.split("/")[-1]
        return Path(urllib.parse.urlsplit(self.url).path).name if self.url else f"{self.name}.pt"

    def size_text(self) -> str:
        if self.size is not None:
            return f"{self.size:,} bytes ({self.size / 2**20:.1f} MiB)"
        if self.approx_mb is not None:
            return f"about {self.approx_mb:,} MB (float32 weights)"
        return "size not published"

    def how_text(self) -> str:
        if self.how:
            return self.how
        verified = "size and sha256 checked" if self.sha256 else "size checked where the server gives it"
        if self.hf_repo:
            verified = "sizes and sha256 from the repository's file list"
        return f"dcase-kit checkpoints fetch {self.name} DIR (resumable; {verified})"


def _beats() -> list[Release]:
    from kit.backbones import nabeats

    by_hand = [
        (
            "BEATs_iter3_plus_AS2M",
            "BEATs iter3+, pre-trained on AudioSet-2M (self-supervised): the AudioCC recipes' release",
            "audiocc_1, audiocc_3, audiocc_4, audiocc_1_w1 (BEATS_CHECKPOINT)",
        ),
        (
            "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2",
            "BEATs iter3+ AS2M, fine-tuned on AudioSet-2M labels (has the tagging predictor)",
            "any BEATs step (BEATS_CHECKPOINT)",
        ),
    ]
    releases = [
        Release(
            "BEATs_iter3",
            "beats",
            "BEATs iter3, pre-trained on AudioSet-2M (self-supervised); Microsoft's file as MERL re-hosts it "
            "for NA-BEATs (MIT)",
            NABEATS_PAGE,
            url=nabeats.BASE_URL,
            approx_mb=361,
            use="any BEATs step (BEATS_CHECKPOINT); the base of every NA-BEATs release (NABEATS_BASE)",
        )
    ]
    for name, what, use in by_hand:
        releases.append(
            Release(
                name,
                "beats",
                what,
                BEATS_PAGE,
                approx_mb=361,
                how=BEATS_BY_HAND.format(file=f"{name}.pt"),
                use=use,
            )
        )
    return releases


def _eat() -> list[Release]:
    sizes = {"base": 360, "large": 1_235}
    rows = []
    for size, epochs in (("base", 30), ("large", 20)):
        for stage, what in (
            ("pretrain", "pre-trained on AudioSet-2M"),
            ("finetune_AS2M", "fine-tuned on AS-2M"),
        ):
            use = (
                "eat_asp_1 ... eat_asp_4, eat_asp_4_w1 (EAT_CHECKPOINT)"
                if (size, stage) == ("base", "pretrain")
                else ""
            )
            rows.append(
                Release(
                    f"EAT-{size}_epoch{epochs}_{stage}",
                    "eat",
                    f"EAT-{size}, {what}",
                    EAT_PAGE,
                    hf_repo=f"worstchan/EAT-{size}_epoch{epochs}_{stage}",
                    approx_mb=sizes[size],
                    use=use or "any EAT step (EAT_CHECKPOINT)",
                )
            )
    return rows


def _fisher() -> list[Release]:
    sizes = {"tiny": 26, "mini": 45, "small": 95}
    return [
        Release(
            f"FISHER-{size}-0723",
            "fisher",
            f"FISHER-{size} (the Hugging Face layout; the README's Tsinghua Cloud .pt file loads too)",
            FISHER_PAGE,
            hf_repo=f"jiangab/FISHER-{size}-0723",
            approx_mb=mb,
            use="audiocc_2 (FISHER_CHECKPOINT)" if size == "small" else "any FISHER step (FISHER_CHECKPOINT)",
        )
        for size, mb in sizes.items()
    ]


def _efficientat() -> list[Release]:
    from kit.backbones import efficientat

    rows = []
    for name, entry in efficientat.RELEASES.items():
        parameters = entry.get("parameters")
        rows.append(
            Release(
                name,
                "efficientat",
                f"EfficientAT MobileNetV3 width {entry.get('width')}, AudioSet mAP {entry.get('mAP')} (MIT)",
                EFFICIENTAT_PAGE,
                url=efficientat.RELEASE_URL.rstrip("/") + "/" + entry["file"],
                size=entry.get("bytes"),
                approx_mb=round(parameters * 4 / 1e6) if parameters else None,
                sha256=entry.get("sha256") or KNOWN_SHA256.get(entry["file"]),
                use="the EfficientAT notebook (checkpoint: the release name or the file)",
            )
        )
    return rows


def _nabeats() -> list[Release]:
    from kit.backbones import nabeats

    return [
        Release(
            name,
            "nabeats",
            "NA-BEATs (MERL, the 2026 winner): fusion layers only, with the base BEATs_iter3.pt beside it "
            "(AGPL-3.0 weights)",
            NABEATS_PAGE,
            url=url,
            use="nabeats, nabeats_finetune (NABEATS_CHECKPOINT: the release name or the .ckpt; NABEATS_BASE)",
            with_files=("BEATs_iter3",),
        )
        for name, url in nabeats.RELEASES.items()
    ]


def releases(backbone: str | None = None) -> list[Release]:
    """Every known release (of one backbone when given), in listing order."""
    rows = [*_beats(), *_eat(), *_fisher(), *_efficientat(), *_nabeats()]
    if backbone is None:
        return rows
    chosen = [r for r in rows if r.backbone == backbone]
    if not chosen:
        raise ValueError(
            f"no releases of backbone {backbone!r}: backbones with releases are "
            f"{', '.join(dict.fromkeys(r.backbone for r in rows))}"
        )
    return chosen


def find(name: str) -> Release:
    """The release called ``name`` (case-insensitive; a Hugging Face repo id or a file name works too)."""
    wanted = name.strip().lower()
    for release in releases():
        aliases = {release.name.lower(), release.file.lower(), (release.hf_repo or "").lower()}
        if wanted in aliases or wanted + ".pt" in aliases:
            return release
    import difflib

    names = [r.name for r in releases()]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise KeyError(f"unknown checkpoint {name!r}{hint}; `dcase-kit checkpoints` lists them all")


# --------------------------------------------------------------------------------------------------
# fetching


class NotDirectError(ValueError):
    """A release that has no direct link: only a person with a browser can download it."""


def _json(url: str, timeout: float = 30.0) -> object:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot read {url}: the server answered HTTP {err.code} {err.reason}") from err
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"cannot reach {url}: {getattr(err, 'reason', err)} (offline?)") from err
    except ValueError as err:
        raise DownloadError(f"{url} did not return JSON: {err}") from err


def hf_files(repo: str, revision: str = "main", endpoint: str | None = None) -> tuple[str, list[dict]]:
    """``(commit, [{"path", "size", "sha256"}, ...])`` of a Hugging Face model repository, from its API
    (``GET <endpoint>/api/models/<repo>/revision/<revision>?blobs=true``). The weights keep one format:
    ``model.safetensors`` when the repository has it, else its torch files."""
    base = (endpoint or HF_ENDPOINT).rstrip("/")
    url = f"{base}/api/models/{repo}/revision/{urllib.parse.quote(revision, safe='')}?blobs=true"
    payload = _json(url)
    siblings = payload.get("siblings") if isinstance(payload, dict) else None
    if not isinstance(siblings, list) or not all(isinstance(s, dict) and "rfilename" in s for s in siblings):
        raise DownloadError(f"{url} returned no 'siblings' list of {{rfilename, size}} entries")
    files = []
    for entry in siblings:
        path = str(entry["rfilename"])
        if path == ".gitattributes" or path.startswith("."):
            continue
        lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
        size = lfs.get("size", entry.get("size"))
        files.append(
            {"path": path, "size": int(size) if size is not None else None, "sha256": lfs.get("sha256")}
        )
    names = {f["path"] for f in files}
    if "model.safetensors" in names:  # the same weights again as a pickle: not downloaded twice
        files = [f for f in files if not f["path"].endswith((".bin", ".pt", ".pth", ".ckpt"))]
    return str(payload.get("sha") or revision), files


def _safe_relative(path: str, repo: str) -> Path:
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts or not parts:
        raise DownloadError(
            f"Hugging Face repository {repo} lists the file {path!r}, which would land outside its folder"
        )
    return Path(*parts)


def _refuse_page(path: Path, url: str) -> None:
    from kit.backbones import loading

    if loading.is_web_page(path):
        path.unlink()
        raise DownloadError(
            f"{url} sent a web page (HTML), not the checkpoint; it was removed. Open the link in a browser "
            "to see what the site wants (a sign-in, a new link), download the file there and pass its path"
        )


def fetch_release(
    release: Release | str, folder: str | os.PathLike, *, progress: bool = True, endpoint: str | None = None
) -> Path:
    """Download one release into ``folder`` and return its path (a file, or the folder of a Hugging Face
    repository). Resumable: an interrupted download continues where it stopped, complete files are
    kept. Raises :class:`NotDirectError` with what to do for a release without a direct link."""
    release = find(release) if isinstance(release, str) else release
    folder = Path(folder)
    if not release.direct:
        raise NotDirectError(f"{release.name} has no direct download link: {release.how_text()}")
    if release.hf_repo:
        commit, files = hf_files(release.hf_repo, endpoint=endpoint)
        target = folder / release.file
        base = (endpoint or HF_ENDPOINT).rstrip("/")
        for entry in files:
            url = f"{base}/{release.hf_repo}/resolve/{commit}/{urllib.parse.quote(entry['path'])}"
            dest = target / _safe_relative(entry["path"], release.hf_repo)
            fetch(url, dest, expected_size=entry["size"], sha256=entry["sha256"], progress=progress)
            _refuse_page(dest, url)
        return target
    target = fetch(
        release.url,
        folder / release.file,
        expected_size=release.size,
        sha256=release.sha256,
        progress=progress,
    )
    _refuse_page(target, release.url)
    return target


def fetch_all(names: Sequence[str], folder: str | os.PathLike, **options) -> list[Path]:
    """:func:`fetch_release` for each name and the files that come with it (NA-BEATs' base), once each."""
    wanted: list[Release] = []
    for name in names:
        release = find(name)
        for item in (*(find(extra) for extra in release.with_files), release):  # the base first
            if item not in wanted:
                wanted.append(item)
    by_hand = [r for r in wanted if not r.direct]
    if by_hand:
        raise NotDirectError(
            "; ".join(f"{r.name} has no direct download link: {r.how_text()}" for r in by_hand)
        )
    return [fetch_release(release, folder, **options) for release in wanted]


# --------------------------------------------------------------------------------------------------
# command line


def listing(rows: Sequence[Release]) -> str:
    """The text ``dcase-kit checkpoints`` prints: per backbone, each release with its source, size,
    how to get it and where it is used."""
    lines = []
    for backbone in dict.fromkeys(r.backbone for r in rows):
        lines.append(f"{backbone}")
        for release in (r for r in rows if r.backbone == backbone):
            where = (
                f"https://huggingface.co/{release.hf_repo}"
                if release.hf_repo
                else release.url or release.source
            )
            lines += [
                f"  {release.name}",
                f"      what:   {release.what}",
                f"      from:   {where}"
                + (f"  (official page: {release.source})" if where != release.source else ""),
                f"      size:   {release.size_text()}",
                f"      get:    {release.how_text()}",
            ]
            if release.with_files:
                lines.append(f"      with:   {', '.join(release.with_files)} (fetched beside it)")
            if release.use:
                lines.append(f"      used by: {release.use}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m kit.checkpoints") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fetch"]:
        return _fetch_main(argv[1:], prog)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Where each official backbone checkpoint comes from, its size and how to get it. "
        f"`{prog} fetch NAME DIR` downloads the ones with a direct link (Hugging Face, GitHub releases).",
        epilog=f"examples:\n  {prog}\n  {prog} --backbone beats\n  {prog} fetch FISHER-small-0723 checkpoints/\n"
        f"  {prog} fetch dcase2026_nabeats_seed0 checkpoints/   # with its base BEATs_iter3.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backbone", help="only this backbone's releases (beats, eat, fisher, efficientat, nabeats)"
    )
    parser.add_argument("--names", action="store_true", help="only the names, one a line")
    args = parser.parse_args(argv)
    try:
        rows = releases(args.backbone)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(r.name for r in rows) if args.names else listing(rows), end="\n")
    return 0


def _fetch_main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog} fetch",
        description="Download releases with a direct link into DIR (resumable; sizes and known sha256 checked). "
        "A Hugging Face repository becomes the folder DIR/<repo name>/, which the loaders read as it is.",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="release names (see the listing)")
    parser.add_argument("dir", type=Path, metavar="DIR", help="where the files go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--endpoint", default=None, help="Hugging Face endpoint (default: $HF_ENDPOINT or huggingface.co)"
    )
    args = parser.parse_args(argv)
    try:
        paths = fetch_all(args.names, args.dir, progress=not args.no_progress, endpoint=args.endpoint)
    except (KeyError, NotDirectError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except OSError as err:  # DownloadError, ChecksumError: one clear line; the .part file stays to resume
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
