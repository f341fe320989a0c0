"""The data stage: dataset index, audio loading (near/far), length policies and proxy-task labels.

Everything downstream starts from the **index**, a DataFrame with one row per WAV clip, built by
walking the official layout (``<root>/{dev,eval}_data/raw/<machine>/{train,test}/*.wav``). It reads
the 2026 stereo release and the mono 2023-2025 releases alike: the file names follow one scheme::

    section_<XX>_<source|target>_<train|test>_<normal|anomaly>_<NNNN>_<attr>.wav
    section_<XX>_<NNNN>.wav          (evaluation test clips, labels hidden)

The 2020-2022 releases load too (``NAMING_BY_YEAR``). They have no ``raw/`` level
(``<root>/dev_data/<machine>/...``); 2021 splits its test clips into ``source_test/`` and
``target_test/`` and names them without attributes (``section_00_source_test_normal_0000.wav``; hidden:
``section_03_source_test_0000.wav``), its training attributes are free text (``strength_1_ambient``,
kept whole as one attribute); 2022 names hidden test clips ``section_03_test_0000.wav``; 2020 names
clips by machine id, ``<normal|anomaly>_id_<XX>_<NNNNNNNN>.wav`` (hidden: ``id_<XX>_<NNNNNNNN>.wav``):
the id becomes the section and every clip is in the source domain (2020 had no domain shift).

Index columns (a contract every other module relies on), see ``INDEX_COLUMNS``:
``path`` (absolute), ``file_name``, ``dataset`` (dev/eval), ``machine``, ``section`` ("00"),
``split`` (train/test), ``domain`` (source/target/unknown), ``label`` (normal/anomaly/unknown),
``attributes`` (the ``<attr>`` part of the name, "" when hidden), ``attribute_dict`` (JSON object),
``duration`` (s), ``channels``, ``sample_rate``.

Attribute strings are ``key_value`` pairs (``car_C2_spd_5_mic_2_mic_1``); ``noAttribute`` means
none. A key repeated in one name is kept in order and numbered from its second occurrence:
``mic``, ``mic_2``, ``mic_3`` (a suffixed key cannot collide with a real key, because real keys
never contain ``_``). Keys start with a letter and may hold letters, digits and ``-`` (real keys
include ``v1pat`` and ``m-n``). The ``attributes_XX.csv`` files beside each machine's folders are
the organisers' declaration: their values must agree with the names, and they fill in the
attributes of clips whose names carry none.

Channels: 2026 clips are stereo, channel 0 = ``near`` microphone, channel 1 = ``far`` microphone.
A mono clip (earlier years) only has ``near``. Training and extraction read one item per (clip,
channel), which is how the EAT-ASP system doubles its training data; a channel may also be one of the
far-channel cancellers of ``kit.denoise`` (``w1``, ``ss``, ...), computed from the stereo clip.

Reading is lean: ``read_clip(path, channel, length_policy, rng)`` draws the crop from the frame count
in the WAV header first and then decodes only that window (``load_audio(..., start=, frames=)``),
with results equal to decoding the whole clip and cutting it (``python -m kit.tools.bench loader``
measures the difference).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as audio_functional
from tqdm.auto import tqdm

from kit import denoise
from kit.files import atomic_path

INDEX_COLUMNS = (
    "path",
    "file_name",
    "dataset",
    "machine",
    "section",
    "split",
    "domain",
    "label",
    "attributes",
    "attribute_dict",
    "duration",
    "channels",
    "sample_rate",
)
DATASET_FOLDERS = {"dev": "dev_data", "eval": "eval_data"}
SPLITS = ("train", "test")
CHANNEL_INDEX = {"near": 0, "far": 1}
SAMPLE_RATE = 16000
NO_ATTRIBUTE = "noAttribute"

FULL_NAME = re.compile(
    r"section_(?P<section>\d{2})_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<number>\d+)(?:_(?P<attributes>.+))?\.wav"
)  # 2021 test names carry no attributes
HIDDEN_NAME = re.compile(
    r"section_(?P<section>\d{2})_(?:(?:(?P<domain>source|target)_)?test_)?(?P<number>\d+)\.wav"
)
ID_NAME = re.compile(r"(?:(?P<label>normal|anomaly)_)?id_(?P<section>\d{2})_(?P<number>\d+)\.wav")  # 2020
# One example per year, the index's contract (tests/test_data.py builds a root of each year from these).
NAMING_BY_YEAR = {
    "2020": ("dev_data/<machine>/{train,test}", "normal_id_00_00000000.wav", "id_01_00000000.wav"),
    "2021": (
        "dev_data/<machine>/{train,source_test,target_test}",
        "section_00_source_train_normal_0000_strength_1_ambient.wav",
        "section_03_source_test_0000.wav",
    ),
    "2022": (
        "dev_data/<machine>/{train,test}",
        "section_00_source_train_normal_0000_m-n_W.wav",
        "section_03_test_0000.wav",
    ),
    "2023-2026": (
        "dev_data/raw/<machine>/{train,test}",
        "section_00_source_train_normal_0000_spd_1.wav",
        "section_00_0000.wav",
    ),
}
NAMING_HELP = (
    "section_<XX>_<source|target>_<train|test>_<normal|anomaly>_<NNNN>_<attr>.wav "
    "(or section_<XX>_<NNNN>.wav for hidden evaluation test clips; 2020: <normal|anomaly>_id_<XX>_<NNNNNNNN>.wav)"
)
TEST_FOLDERS = {"test": None, "source_test": "source", "target_test": "target"}  # folder -> domain (2021)
ATTRIBUTE_KEY = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


class DatasetError(ValueError):
    """The data on disk (layout, file name, attribute table, audio) is not what the task defines."""


# ----------------------------------------------------------------------------------------------
# File names and attributes


def parse_file_name(file_name: str) -> dict[str, str]:
    """Split an official clip name into section, domain, split, label and attribute string.

    Hidden evaluation test names (``section_00_0000.wav``; 2021 ``section_03_source_test_0000.wav``
    keeps its domain, 2022 ``section_03_test_0000.wav``) give split "test", label "unknown", domain
    "unknown" where the name has none, and attributes "". 2020 names (``normal_id_00_00000000.wav``)
    give the machine id as the section, domain "source" and split "" (the folder tells it; hidden
    ``id_01_00000000.wav``: label "unknown"). Raises ``DatasetError`` for any other name.
    """
    match = FULL_NAME.fullmatch(file_name)
    if match:
        fields = {key: match[key] for key in ("section", "domain", "split", "label", "attributes")}
        return fields | {"attributes": fields["attributes"] or ""}
    match = HIDDEN_NAME.fullmatch(file_name)
    if match:
        return {
            "section": match["section"],
            "domain": match["domain"] or "unknown",
            "split": "test",
            "label": "unknown",
            "attributes": "",
        }
    match = ID_NAME.fullmatch(file_name)
    if match:
        hidden = match["label"] is None
        return {
            "section": match["section"],
            "domain": "source",
            "split": "test" if hidden else "",
            "label": match["label"] or "unknown",
            "attributes": "",
        }
    raise DatasetError(f"file name {file_name!r} does not follow the official naming: expected {NAMING_HELP}")


def _attribute_pairs(attributes: str) -> list[tuple[str, str]]:
    """``car_C2_spd_5`` -> [("car", "C2"), ("spd", "5")]; ``noAttribute`` and "" -> []."""
    if attributes in ("", NO_ATTRIBUTE):
        return []
    tokens = attributes.split("_")
    keys, values = tokens[0::2], tokens[1::2]
    if len(keys) != len(values) or not all(ATTRIBUTE_KEY.fullmatch(k) for k in keys) or "" in values:
        raise DatasetError(
            f"attribute string {attributes!r} is not a sequence of key_value pairs "
            "(expected e.g. 'spd_1' or 'car_C2_spd_5_mic_2_mic_1', or 'noAttribute')"
        )
    return list(zip(keys, values))


def _pairs_to_dict(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Keep pairs in order; the n-th occurrence (n >= 2) of a key is stored as ``<key>_<n>``."""
    result: dict[str, str] = {}
    seen: dict[str, int] = {}
    for key, value in pairs:
        seen[key] = seen.get(key, 0) + 1
        result[key if seen[key] == 1 else f"{key}_{seen[key]}"] = value
    return result


def parse_attributes(attributes: str) -> dict[str, str]:
    """Parse an attribute string into an ordered dict (repeated keys numbered ``mic``, ``mic_2``)."""
    return _pairs_to_dict(_attribute_pairs(attributes))


def read_attribute_table(csv_path: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """Read an ``attributes_XX.csv``: {clip file name: [(key, value), ...]}.

    Accepts the earlier years' ``file_name,d1p,d1v,d2p,d2v,...`` and the 2026 listing alike: a
    header row, the file name (optionally prefixed ``<machine>/<split>/``) in the first column,
    then alternating key and value columns. Empty keys and ``noAttribute`` are skipped.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and row[0].strip()]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"attribute table {csv_path} is not a readable CSV: {err}") from err
    if rows and not rows[0][0].strip().lower().endswith(".wav"):
        rows = rows[1:]  # the header row
    table = {}
    for row in rows:
        name = PurePosixPath(row[0].strip().replace("\\", "/")).name
        cells = [cell.strip() for cell in row[1:]]
        cells += [""] * (len(cells) % 2)
        table[name] = [
            (key, value) for key, value in zip(cells[0::2], cells[1::2]) if key and key != NO_ATTRIBUTE
        ]
    return table


def _machine_attribute_table(machine_dir: Path) -> dict[str, list[tuple[str, str]]]:
    table: dict[str, list[tuple[str, str]]] = {}
    for csv_path in sorted(machine_dir.glob("attributes_*.csv")):
        table.update(read_attribute_table(csv_path))
    return table


def _attribute_dict(
    path: Path, attributes: str, table: dict[str, list[tuple[str, str]]], free_text: bool = False
) -> dict[str, str]:
    """Attributes of one clip from its name, cross-checked against (or filled from) the CSV table.
    With ``free_text`` (2021, whose names carry attributes such as ``strength_1_ambient`` and no CSV)
    a string that is not ``key_value`` pairs is kept whole as the value of ``attribute``."""
    listed = table.get(path.name)
    try:
        named = _attribute_pairs(attributes)
    except DatasetError as err:
        if listed is None and free_text:
            return {"attribute": attributes}
        if listed is None:
            raise DatasetError(f"{path}: {err}; no attributes_XX.csv row lists this clip either") from err
        return _pairs_to_dict(listed)
    if listed is not None and attributes and [v for _, v in named] != [v for _, v in listed]:
        raise DatasetError(
            f"{path}: attributes in the file name {named} disagree with the attributes_XX.csv row {listed} "
            f"in {path.parent.parent}"
        )
    return _pairs_to_dict(named if attributes else (listed or []))


# ----------------------------------------------------------------------------------------------
# The index


def _machine_dirs(root: Path, datasets: Sequence[str]) -> list[tuple[str, Path]]:
    unknown = [name for name in datasets if name not in DATASET_FOLDERS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}: expected a subset of {sorted(DATASET_FOLDERS)}")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    present = [name for name in datasets if (root / DATASET_FOLDERS[name]).is_dir()]
    if not present:
        wanted = ", ".join(DATASET_FOLDERS[name] for name in datasets)
        raise DatasetError(f"dataset root {root} holds none of: {wanted}")
    machines = []
    for name in present:
        folder = root / DATASET_FOLDERS[name]
        raw = folder / "raw"
        # 2023 on: <dataset>_data/raw/<machine>; 2020-2022: <dataset>_data/<machine>, no raw level
        parent = raw if raw.is_dir() else folder
        found = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DatasetError(
                f"{raw} holds no machine folders (nor does {folder}): expected {raw}/<machine>/train/*.wav "
                f"(2023 on) or {folder}/<machine>/train/*.wav (2020-2022)"
            )
        machines += [(name, machine_dir) for machine_dir in found]
    return machines


def _clip_paths(machine_dir: Path) -> list[Path]:
    train_dir = machine_dir / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"machine folder {machine_dir} has no 'train' folder (expected {train_dir})")
    paths = []
    for split in ("train", *TEST_FOLDERS):
        split_dir = machine_dir / split
        if split_dir.is_dir():
            paths += sorted(p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() == ".wav")
    if not any(p.parent == train_dir for p in paths):
        raise DatasetError(f"empty section: {train_dir} holds no WAV clips")
    return paths


def _clip_row(dataset: str, path: Path, table: dict[str, list[tuple[str, str]]]) -> dict:
    try:
        fields = parse_file_name(path.name)
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from err
    folder = path.parent.name
    split = "test" if folder in TEST_FOLDERS else folder
    fields["split"] = fields["split"] or split  # 2020 names do not say their split: the folder does
    if fields["split"] != split:
        raise DatasetError(f"{path}: the name says split '{fields['split']}' but the clip is in '{folder}'")
    if TEST_FOLDERS.get(folder) not in (None, fields["domain"]):
        raise DatasetError(f"{path}: the name says domain '{fields['domain']}' but the clip is in '{folder}'")
    legacy = path.parent.parent.parent.name != "raw"  # 2020-2022 layouts: 2021's free-text attributes
    attributes = _attribute_dict(path, fields["attributes"], table, free_text=legacy)
    return {
        "path": str(path),
        "file_name": path.name,
        "dataset": dataset,
        "machine": path.parent.parent.name,
        **fields,
        "attribute_dict": json.dumps(attributes),
    }


def _probe(path: str) -> tuple[float, int, int]:
    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError) as err:
        raise DatasetError(f"unreadable or corrupt WAV {path}: {err}") from err
    if info.frames <= 0:
        raise DatasetError(f"corrupt WAV {path}: it holds no samples")
    return info.frames / info.samplerate, info.channels, info.samplerate


def _check_sections(index: pd.DataFrame) -> None:
    trained = set(
        index.loc[index["split"] == "train", ["dataset", "machine", "section"]].itertuples(index=False)
    )
    for row in index.drop_duplicates(["dataset", "machine", "section"]).itertuples(index=False):
        if (row.dataset, row.machine, row.section) not in trained:
            raise DatasetError(
                f"empty section: section {row.section} of {row.machine} ({row.dataset}) has test clips "
                f"(e.g. {row.path}) but no training clips"
            )


def build_index(
    root: str | os.PathLike,
    *,
    datasets: Sequence[str] = ("dev", "eval"),
    probe_audio: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Walk ``<root>/{dev,eval}_data/raw/<machine>/{train,test}/*.wav`` into the index DataFrame.

    Requested datasets whose folder is absent are skipped (a root with only ``dev_data`` is
    normal); a root with none of them is an error. A machine needs a ``train`` folder; ``test`` is
    optional (the additional training data come before the evaluation test set). With
    ``probe_audio`` each WAV header is read for ``duration``, ``channels`` and ``sample_rate``
    (corrupt files fail here, naming the file); without it those columns are missing values.
    Rows are sorted by dataset, machine, section, split and file name.
    """
    root = Path(root).expanduser().absolute()
    rows = []
    for dataset, machine_dir in _machine_dirs(root, tuple(datasets)):
        table = _machine_attribute_table(machine_dir)
        rows += [_clip_row(dataset, path, table) for path in _clip_paths(machine_dir)]
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS[:10]))
    _check_sections(index)
    if probe_audio:
        probed = [
            _probe(p)
            for p in tqdm(index["path"], desc="reading WAV headers", unit="clip", disable=not progress)
        ]
        durations, channels, rates = zip(*probed)
        index["duration"] = np.asarray(durations, dtype=np.float64)
        index["channels"] = np.asarray(channels, dtype=np.int64)
        index["sample_rate"] = np.asarray(rates, dtype=np.int64)
    else:
        index["duration"] = np.nan
        index["channels"] = pd.array([pd.NA] * len(index), dtype="Int64")
        index["sample_rate"] = pd.array([pd.NA] * len(index), dtype="Int64")
    index = index.sort_values(
        ["dataset", "machine", "section", "split", "file_name", "path"], kind="mergesort"
    )
    return index.reset_index(drop=True)


def _require_columns(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(f"{what} lacks column(s) {missing}")


def check_index(
    df: pd.DataFrame,
    require_stereo: bool = True,
    *,
    sample_rate: int = SAMPLE_RATE,
    allow_resample: bool = False,
) -> None:
    """Raise ``DatasetError`` naming the first offending clip when the audio is not usable as is:
    a mono clip where stereo (near + far) is required, or a sample rate other than ``sample_rate``
    when resampling is not allowed. The index must have been built with ``probe_audio=True``."""
    _require_columns(df, INDEX_COLUMNS, "the index")
    unprobed = df["channels"].isna() | df["sample_rate"].isna()
    if unprobed.any():
        raise DatasetError(
            f"{df.loc[unprobed, 'path'].iloc[0]} has no channel count or sample rate: "
            "build the index with probe_audio=True"
        )
    if require_stereo:
        mono = df["channels"] < 2
        if mono.any():
            raise DatasetError(
                f"{df.loc[mono, 'path'].iloc[0]} is mono ({int(mono.sum())} mono clip(s) in all) but stereo "
                "near/far clips are required"
            )
    if not allow_resample:
        other = df["sample_rate"] != sample_rate
        if other.any():
            first = df.loc[other].iloc[0]
            raise DatasetError(
                f"{first['path']} has sample rate {first['sample_rate']} Hz, expected {sample_rate} Hz "
                f"({int(other.sum())} clip(s) in all; allow resampling to use them)"
            )


def save_index(df: pd.DataFrame, run_dir: str | os.PathLike) -> Path:
    """Write the index to ``<run_dir>/index.csv`` atomically and return that path."""
    _require_columns(df, INDEX_COLUMNS, "the index to save")
    path = Path(run_dir) / "index.csv"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def load_index(path: str | os.PathLike) -> pd.DataFrame:
    """Read an index saved by ``save_index`` (a CSV path, or the run folder holding ``index.csv``).

    Text columns come back as strings ("00" stays "00", "" stays ""); ``duration`` as float;
    ``channels`` and ``sample_rate`` as int64 (nullable Int64 when not probed). Extra columns
    come back as strings.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    _require_columns(df, INDEX_COLUMNS, f"index file {path}")
    df["duration"] = pd.to_numeric(df["duration"].replace("", np.nan)).astype(np.float64)
    for column in ("channels", "sample_rate"):
        values = pd.to_numeric(df[column].replace("", np.nan))
        df[column] = values.astype("Int64") if values.isna().any() else values.astype(np.int64)
    return df


# ----------------------------------------------------------------------------------------------
# Channels: the two microphones and the far-channel cancellers of kit.denoise


def channel_names() -> tuple[str, ...]:
    """Every channel name: ``near``, ``far`` and each canceller (``w1``, ``ss``, ...), which is computed
    on the fly from the stereo clip and can stand wherever a channel can."""
    return tuple(CHANNEL_INDEX) + tuple(denoise.CANCELLERS)


def check_channel(channel: str) -> str:
    if channel not in channel_names():
        raise ValueError(f"unknown channel {channel!r}: expected one of {', '.join(channel_names())}")
    return channel


def needs_stereo(channel: str) -> bool:
    """Whether a channel needs the far microphone (every channel but ``near``)."""
    return check_channel(channel) != "near"


def usable_channels(channels, index: pd.DataFrame, *, mono_fallback: bool = False) -> tuple[str, ...]:
    """``channels`` as a dataset can give them. On a dataset with mono clips a channel that needs the
    far microphone is an error naming a mono clip, or, with ``mono_fallback`` (the default recipe's
    choice, so any dataset root runs as it is), left out with a note."""
    channels = tuple(check_channel(c) for c in ((channels,) if isinstance(channels, str) else channels))
    mono = index.loc[index["channels"].fillna(2) < 2, "path"]
    stereo_only = [c for c in channels if needs_stereo(c)]
    if mono.empty or not stereo_only:
        return channels
    if not mono_fallback:
        raise DatasetError(
            f"channel(s) {stereo_only} need the far microphone but {mono.iloc[0]} is mono "
            f"({len(mono)} mono clips): use the near channel on mono data"
        )
    kept = tuple(c for c in channels if c not in stereo_only)
    if not kept:
        raise DatasetError(
            f"every channel of {list(channels)} needs the far microphone, but {mono.iloc[0]} is mono"
        )
    print(f"mono clips (e.g. {mono.iloc[0]}): channels {stereo_only} left out, using {list(kept)}")
    return kept


def derive_channel(pair: np.ndarray, channel: str, settings: dict | None = None) -> np.ndarray:
    """Channel ``channel`` of a stereo clip ``[2, T]``: a microphone, or a canceller's output (with
    ``settings[channel]``, its settings over the defaults)."""
    if channel in CHANNEL_INDEX:
        return pair[CHANNEL_INDEX[channel]]
    return denoise.cancel_numpy(pair, check_channel(channel), **((settings or {}).get(channel) or {}))


def canceller_key(channels, settings: dict | None = None) -> list[str]:
    """The cancellers among ``channels`` with every setting (for cache keys); [] for microphones only."""
    return [denoise.settings_key(c, (settings or {}).get(c)) for c in channels if c in denoise.CANCELLERS]


# ----------------------------------------------------------------------------------------------
# Audio

AUDIO_CHANNELS = ("near", "far", "both")


@contextlib.contextmanager
def _open_clip(path: Path, channel: str, canceller: str | None = None):
    """The clip's open ``SoundFile`` once it is known to be readable, to hold samples, to be mono or
    stereo and to have ``channel``. Only the header is read here."""
    if channel not in AUDIO_CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: expected 'near', 'far' or 'both'")
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        handle = sf.SoundFile(path)
    except (sf.SoundFileError, RuntimeError) as err:
        raise DatasetError(f"unreadable or corrupt audio file {path}: {err}") from err
    with handle:
        if handle.frames <= 0:
            raise DatasetError(f"corrupt audio file {path}: it holds no samples")
        if handle.channels > 2:
            raise DatasetError(f"{path} has {handle.channels} channels: expected mono or stereo (near, far)")
        if channel != "near" and handle.channels == 1:
            asked = canceller or channel
            raise DatasetError(
                f"mono clip {path} has no far channel (channel={asked!r} needs a stereo near/far clip"
                + (": a canceller uses the far microphone as its noise reference)" if canceller else ")")
            )
        yield handle


def _read_frames(handle: sf.SoundFile, path: Path, channel: str, start: int, frames: int) -> np.ndarray:
    """Frames ``start .. start + frames`` (``frames=-1``: to the end) of one channel ([T]) or of both
    ([2, T]). libsndfile decodes whole frames (every channel), but only the frames asked for."""
    try:
        handle.seek(start)
        data = handle.read(frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:
        raise DatasetError(f"unreadable or corrupt audio file {path}: {err}") from err
    wave = np.ascontiguousarray(data.T if channel == "both" else data[:, CHANNEL_INDEX[channel]])
    if not np.isfinite(wave).all():
        raise DatasetError(f"audio file {path} holds NaN or infinite samples")
    return wave


def _resample(wave: np.ndarray, file_rate: int, sample_rate: int | None) -> np.ndarray:
    if sample_rate is None or file_rate == sample_rate:
        return wave
    return audio_functional.resample(torch.from_numpy(wave), file_rate, sample_rate).numpy()


def load_audio(
    path: str | os.PathLike,
    channel: str = "near",
    sample_rate: int | None = SAMPLE_RATE,
    *,
    start: int = 0,
    frames: int | None = None,
    canceller: str | None = None,
) -> np.ndarray:
    """Read one clip as float32: ``near`` (channel 0) or ``far`` (channel 1) as [T], ``both`` as [2, T].

    A mono clip only has ``near``. The clip is resampled to ``sample_rate`` when its rate differs
    (``None`` keeps the file's rate).

    ``start`` and ``frames`` select the samples ``start .. start + frames`` of the result (counted at
    ``sample_rate``; ``frames=None``: to the end; a window running past the end is cut there, as a
    slice would be). A file already at ``sample_rate`` is read from ``start`` and only ``frames``
    frames are decoded. A file at another rate is decoded whole, resampled, then cut: the resampling
    filter needs the neighbouring samples, so this keeps the result equal to cutting the whole
    resampled clip.
    """
    path = Path(path)
    if int(start) != start or start < 0:
        raise ValueError(f"start must be a non-negative sample index, got {start!r}")
    if frames is not None and (int(frames) != frames or frames <= 0):
        raise ValueError(f"frames must be a positive sample count or None, got {frames!r}")
    start = int(start)
    with _open_clip(path, channel, canceller) as handle:
        file_rate = handle.samplerate
        if sample_rate is not None and file_rate != sample_rate:
            wave = _resample(_read_frames(handle, path, channel, 0, -1), file_rate, sample_rate)
            n_total = wave.shape[-1]
            stop = n_total if frames is None else start + int(frames)
            if start >= n_total:
                raise ValueError(
                    f"start {start} is past the end of {path}: the clip has {n_total} samples "
                    f"at {sample_rate} Hz (after resampling from {file_rate} Hz)"
                )
            wave = np.ascontiguousarray(wave[..., start:stop])
        else:
            if start >= handle.frames:
                raise ValueError(
                    f"start {start} is past the end of {path}: the clip has {handle.frames} samples "
                    f"at {file_rate} Hz"
                )
            wave = _read_frames(handle, path, channel, start, -1 if frames is None else int(frames))
    return wave.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# Length policies (operate on the last axis, so [T] and [2, T] alike)


def _check_n_samples(n_samples: int) -> int:
    if int(n_samples) != n_samples or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return int(n_samples)


def _crop_and_pad(wave: np.ndarray, start: int, n_samples: int) -> tuple[np.ndarray, int]:
    """``wave[..., start:start + n]``, zero-padded at the end to ``n``; also the real-audio length."""
    segment = wave[..., start : start + n_samples]
    valid = segment.shape[-1]
    if valid == n_samples:
        return segment, valid
    out = np.zeros(wave.shape[:-1] + (n_samples,), dtype=wave.dtype)
    out[..., :valid] = segment
    return out, valid


def fit_length(wave: np.ndarray, n_samples: int) -> np.ndarray:
    """Keep the first ``n_samples`` samples, zero-padding a shorter clip (the EAT-ASP 16 s input)."""
    return _crop_and_pad(wave, 0, _check_n_samples(n_samples))[0]


def _random_start(n_total: int, n_samples: int, rng: np.random.Generator) -> int:
    return int(rng.integers(0, n_total - n_samples + 1)) if n_total > n_samples else 0


def random_crop(wave: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed ``n_samples`` window; a shorter clip is zero-padded instead."""
    n_samples = _check_n_samples(n_samples)
    return _crop_and_pad(wave, _random_start(wave.shape[-1], n_samples, rng), n_samples)[0]


def _fixed_start(n_total: int, n_samples: int, offset: int | str) -> int:
    if offset == "center":
        return max((n_total - n_samples) // 2, 0)
    if isinstance(offset, str) or int(offset) != offset or offset < 0:
        raise ValueError(f"offset must be 'center' or a non-negative sample count, got {offset!r}")
    if offset >= n_total:
        raise ValueError(f"offset {offset} is past the end of a {n_total}-sample clip")
    return int(offset)


def fixed_crop(wave: np.ndarray, n_samples: int, offset: int | str = 0) -> np.ndarray:
    """The ``n_samples`` window starting at ``offset`` samples (or centred), zero-padded at the end."""
    n_samples = _check_n_samples(n_samples)
    return _crop_and_pad(wave, _fixed_start(wave.shape[-1], n_samples, offset), n_samples)[0]


LENGTH_MODES = ("pad_or_cut", "random_crop", "fixed_crop", "none")


@dataclass(frozen=True)
class LengthPolicy:
    """How a clip is brought to the model's input length.

    ``pad_or_cut`` = ``fit_length`` (EAT-ASP: 16 s), ``random_crop`` (training), ``fixed_crop``
    (``offset`` seconds from the start, or "center"), ``none`` (the clip as recorded).
    """

    mode: str = "none"
    seconds: float | None = None
    sample_rate: int = SAMPLE_RATE
    offset: float | str = 0.0

    def __post_init__(self) -> None:
        if self.mode not in LENGTH_MODES:
            raise ValueError(f"unknown length mode {self.mode!r}: expected one of {LENGTH_MODES}")
        if self.mode != "none" and (self.seconds is None or not self.seconds > 0):
            raise ValueError(f"length mode {self.mode!r} needs seconds > 0, got {self.seconds!r}")
        if self.offset != "center" and (isinstance(self.offset, str) or not self.offset >= 0):
            raise ValueError(f"offset must be 'center' or non-negative seconds, got {self.offset!r}")

    @property
    def n_samples(self) -> int | None:
        return None if self.seconds is None else max(1, round(self.seconds * self.sample_rate))

    def apply(self, wave: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The wave brought to length (``rng`` is needed by ``random_crop`` only)."""
        return self.apply_with_length(wave, rng)[0]

    def apply_with_length(
        self, wave: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, int]:
        """As ``apply``, plus how many samples of the result are real audio (the rest is padding)."""
        start, n_samples = self.window(wave.shape[-1], rng)
        if n_samples is None:
            return wave, wave.shape[-1]
        return _crop_and_pad(wave, start, n_samples)

    def window(self, n_total: int, rng: np.random.Generator | None = None) -> tuple[int, int | None]:
        """``(start, n_samples)`` of the window kept from a clip of ``n_total`` samples (``n_samples``
        None: the whole clip). ``random_crop`` draws from ``rng`` exactly as ``apply`` does, so a
        reader that knows the clip's length can read only this window (``read_clip``)."""
        if self.mode == "none":
            return 0, None
        if self.mode == "pad_or_cut":
            return 0, self.n_samples
        if self.mode == "random_crop":
            if rng is None:
                raise ValueError("length mode 'random_crop' needs a numpy Generator (rng)")
            return _random_start(n_total, self.n_samples, rng), self.n_samples
        offset = self.offset if self.offset == "center" else round(self.offset * self.sample_rate)
        return _fixed_start(n_total, self.n_samples, offset), self.n_samples


def default_workers() -> int:
    """Loader processes when a ``num_workers`` setting is None: one per core but one (the main process
    feeds the model), at most 8; none on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


# ----------------------------------------------------------------------------------------------
# Reading only the window a length policy keeps


def read_clip(
    path: str | os.PathLike,
    channel: str,
    length: LengthPolicy,
    rng: np.random.Generator | None = None,
    *,
    sample_rate: int | None = SAMPLE_RATE,
    canceller_settings: dict | None = None,
) -> tuple[np.ndarray, int]:
    """One clip brought to length, reading from disk only the window that is kept.

    ``channel`` may be a canceller (``w1``, ...): the stereo clip is then read whole, cancelled with
    ``canceller_settings[channel]`` and cut.

    Returns ``(wave, valid)`` equal to ``length.apply_with_length(load_audio(path, channel,
    sample_rate), rng)``: the same window for the same ``rng`` (the start is drawn from the clip's
    frame count in its header, with the same draws), the same zero padding of a short clip, the
    same errors, except that only the kept window is checked for NaN (samples outside it never
    reach the model). But a 5-s crop of a 16-s stereo clip decodes 5 s, not 16 s.

    Decoded whole (and then cut, exactly as before): length mode ``none``, and a file whose rate
    differs from ``sample_rate`` (resampling needs the samples around the window's edges).
    """
    path = Path(path)
    if length.mode != "none" and sample_rate is not None and length.sample_rate != sample_rate:
        raise ValueError(
            f"length policy counts samples at {length.sample_rate} Hz but audio is loaded at {sample_rate} Hz"
        )
    if channel in denoise.CANCELLERS:
        # A canceller fits its gains on the whole clip (as published), then the window is kept.
        pair = load_audio(path, "both", sample_rate, canceller=channel)
        return length.apply_with_length(derive_channel(pair, channel, canceller_settings), rng)
    with _open_clip(path, channel) as handle:
        if length.mode == "none" or (sample_rate is not None and handle.samplerate != sample_rate):
            whole = _read_frames(handle, path, channel, 0, -1)
            wave = _resample(whole, handle.samplerate, sample_rate).astype(np.float32, copy=False)
            return length.apply_with_length(wave, rng)
        start, n_samples = length.window(handle.frames, rng)
        wave = _read_frames(handle, path, channel, start, n_samples)
    return _crop_and_pad(wave, 0, n_samples)


# ----------------------------------------------------------------------------------------------
# Per-channel items and the streaming dataset


def _channel_tuple(channels: str | Sequence[str]) -> tuple[str, ...]:
    channels = (channels,) if isinstance(channels, str) else tuple(channels)
    if not channels or any(c not in channel_names() for c in channels) or len(set(channels)) != len(channels):
        raise ValueError(f"channels must be distinct names from {channel_names()}, got {channels!r}")
    return channels


def expand_channels(df: pd.DataFrame, channels: str | Sequence[str] = ("near",)) -> pd.DataFrame:
    """One row per (clip, channel), clip-major, with columns ``channel`` and ``row`` (the clip's
    position in ``df``): the frame the label builders take."""
    channels = _channel_tuple(channels)
    if "channel" in df.columns:
        raise ValueError("the frame already has a 'channel' column (already expanded by channel?)")
    rows = np.repeat(np.arange(len(df)), len(channels))
    items = df.iloc[rows].reset_index(drop=True)
    items["channel"] = np.tile(np.asarray(channels, dtype=object), len(df))
    items["row"] = rows
    return items


def pad_waves(waves: Sequence[np.ndarray], min_length: int = 0) -> torch.Tensor:
    """Stack 1-D waves into ``[B, T]`` float32, zero-padded at the end to the longest (at least
    ``min_length`` samples): the one padding of training and extraction batches."""
    out = torch.zeros(len(waves), max([min_length] + [len(w) for w in waves]))
    for row, wave in zip(out, waves):
        row[: len(wave)] = torch.from_numpy(np.asarray(wave, dtype=np.float32))
    return out


# ----------------------------------------------------------------------------------------------
# Proxy-task labels

LABEL_SCHEMES = {
    "section": ("machine", "section"),
    "attribute": ("machine", "section", "attributes"),
    "composite": ("machine", "section", "attributes", "domain", "channel"),
    # KMeans pseudo-labels (kit.pseudolabels) in the PSEUDO_COLUMN, e.g. "pseudo-source-3"
    "pseudo": ("machine", "section", "pseudo_label"),
    "attribute_pseudo": ("machine", "section", "attributes", "domain", "pseudo_label"),
}
PSEUDO_SCHEMES = ("pseudo", "attribute_pseudo")
PSEUDO_COLUMN = "pseudo_label"


def _labels(df: pd.DataFrame, columns: Sequence[str], scheme: str) -> tuple[np.ndarray, list[str]]:
    """Class = the columns' values joined by '|'; classes come from the training rows only
    (rows with ``split == 'train'``, or all rows without a ``split`` column); others get -1."""
    _require_columns(df, columns, f"the frame for {scheme!r} labels")
    keys = df[columns[0]].astype(str)
    for column in columns[1:]:
        keys = keys + "|" + df[column].astype(str)
    train = df["split"].eq("train").to_numpy() if "split" in df.columns else np.ones(len(df), dtype=bool)
    classes = sorted(keys[train].unique())
    if not classes:
        raise DatasetError(f"no training rows to define {scheme!r} classes from")
    codes = pd.Categorical(keys, categories=classes).codes.astype(np.int64)
    return codes, classes


def section_labels(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """machine + section."""
    return _labels(df, LABEL_SCHEMES["section"], "section")


def attribute_labels(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """machine + section + attribute string."""
    return _labels(df, LABEL_SCHEMES["attribute"], "attribute")


def composite_labels(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """machine + section + attributes + domain + channel (the EAT-ASP label); the channel part only
    when the frame has a ``channel`` column (see ``expand_channels``)."""
    columns = [c for c in LABEL_SCHEMES["composite"] if c != "channel" or "channel" in df.columns]
    return _labels(df, columns, "composite")


def needs_pseudo_label(df: pd.DataFrame, scheme: str) -> np.ndarray:
    """Rows whose class under ``scheme`` is a pseudo-label: every row for ``"pseudo"``, the rows of
    clips without attributes (``noAttribute``) for ``"attribute_pseudo"``, none for the other schemes."""
    if scheme == "pseudo":
        return np.ones(len(df), dtype=bool)
    if scheme == "attribute_pseudo":
        _require_columns(df, ["attributes"], "the frame for 'attribute_pseudo' labels")
        return df["attributes"].astype(str).isin(["", NO_ATTRIBUTE]).to_numpy()
    return np.zeros(len(df), dtype=bool)


def _pseudo_keys(df: pd.DataFrame, scheme: str, pseudo: np.ndarray) -> pd.Series:
    """The PSEUDO_COLUMN where ``pseudo``, after checking that every such training row has one."""
    train = df["split"].eq("train").to_numpy() if "split" in df.columns else np.ones(len(df), dtype=bool)
    if PSEUDO_COLUMN not in df.columns:
        values = pd.Series([""] * len(df), index=df.index)
    else:
        values = df[PSEUDO_COLUMN].where(df[PSEUDO_COLUMN].notna(), "").astype(str)
    missing = pseudo & train & values.eq("").to_numpy()
    if missing.any():
        machines = sorted(df.loc[missing, "machine"].astype(str).unique())
        raise DatasetError(
            f"label scheme {scheme!r} needs a pseudo-label (column {PSEUDO_COLUMN!r}) for every training clip "
            f"without attributes, but {int(missing.sum())} rows of machines {machines} have none: "
            "kit.pseudolabels.label_items makes them (kit.train.train does so itself)"
        )
    return values


def pseudo_labels(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """machine + section + pseudo-label (KMeans cluster of the clip's domain, ``kit.pseudolabels``), for
    every machine, with or without attributes."""
    _require_columns(df, ["machine", "section"], "the frame for 'pseudo' labels")
    keys = _pseudo_keys(df, "pseudo", needs_pseudo_label(df, "pseudo"))
    return _labels(df.assign(_class=keys), ("machine", "section", "_class"), "pseudo")


def attribute_pseudo_labels(df: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """machine + section + attributes + domain for clips with attributes, machine + section +
    pseudo-label for clips without (``noAttribute``). Where no training clip lacks attributes there is
    nothing to pseudo-label: a warning, and the classes are machine + section + attributes + domain."""
    _require_columns(
        df, ["machine", "section", "attributes", "domain"], "the frame for 'attribute_pseudo' labels"
    )
    pseudo = needs_pseudo_label(df, "attribute_pseudo")
    train = df["split"].eq("train").to_numpy() if "split" in df.columns else np.ones(len(df), dtype=bool)
    if not (pseudo & train).any():
        warnings.warn(
            "label scheme 'attribute_pseudo': every training clip has attributes (no machine with "
            f"{NO_ATTRIBUTE!r}), so no pseudo-label is used: the classes are machine + section + attributes "
            "+ domain",
            stacklevel=3,
        )
        return _labels(df, ("machine", "section", "attributes", "domain"), "attribute_pseudo")
    plain = df["attributes"].astype(str) + "|" + df["domain"].astype(str)
    keys = plain.where(~pseudo, _pseudo_keys(df, "attribute_pseudo", pseudo))
    return _labels(df.assign(_class=keys), ("machine", "section", "_class"), "attribute_pseudo")


def make_labels(df: pd.DataFrame, scheme: str) -> tuple[np.ndarray, list[str]]:
    """``(codes, classes)`` for ``scheme`` in ``LABEL_SCHEMES``: "section", "attribute", "composite", and
    the pseudo-label schemes "pseudo" and "attribute_pseudo" (which need the PSEUDO_COLUMN, see
    ``kit.pseudolabels``)."""
    builders = {
        "section": section_labels,
        "attribute": attribute_labels,
        "composite": composite_labels,
        "pseudo": pseudo_labels,
        "attribute_pseudo": attribute_pseudo_labels,
    }
    if scheme not in builders:
        raise ValueError(f"unknown label scheme {scheme!r}: expected one of {sorted(builders)}")
    return builders[scheme](df)
