"""Official DCASE Task 2 metrics, result tables and the evaluator command.

The numbers follow the organisers' evaluator (sklearn + scipy) exactly:

- ``AUC(source)``: ``roc_auc_score`` over the source-domain clips plus every anomalous clip of both
  domains (mask ``(domain == source) | (label == anomaly)``); ``AUC(target)`` likewise.
- ``pAUC``: ``roc_auc_score(label, score, max_fpr=0.1)`` (McClish-standardised) over all clips of
  the section, both domains together.
- precision / recall / F1 per domain: over the clips of that domain only, from the 0/1 decisions,
  each denominator floored at machine epsilon (so an empty class gives 0, never a division error).
- official score: ``scipy.stats.hmean`` of the flat list of every AUC(source), AUC(target) and pAUC
  of every (machine, section), each floored at machine epsilon.

Scores travel as a DataFrame with columns ``machine, section, file_name, score, label, domain`` (and
optionally ``decision``); the loaders read the organisers' ground-truth layout and the official
score CSVs, matching rows by file name whatever their order. ``python -m kit.metrics`` evaluates a
score folder (or a submission folder of several systems) against the organisers' ground truth or,
for development clips, against the labels and domains their file names carry.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.metrics import roc_auc_score

from kit.files import atomic_path

EPSILON = np.finfo(float).eps
MAX_FPR = 0.1
SCORE_COLUMNS = ("machine", "section", "file_name", "score", "label", "domain")
DECISION_METRICS = (
    "precision_source",
    "precision_target",
    "recall_source",
    "recall_target",
    "f1_source",
    "f1_target",
)
SECTION_METRICS = (
    "auc_source",
    "auc_target",
    "pauc",
    "hmean",
    "amean",
    "auc_all",
    "hmean_auc",
    "amean_auc",
)
# Metric columns that aggregate rows summarise by the (floored) harmonic mean of the section values.
_PER_METRIC_HMEAN = ("auc_source", "auc_target", "pauc", "auc_all", *DECISION_METRICS)
TABLE_KEY_COLUMNS = ("system", "level", "machine", "section", "n_clips")
OVERALL = "overall"
ALL_SECTIONS = "all"

SCORE_FILE = re.compile(r"^anomaly_score_(?P<machine>.+)_section_(?P<section>\d{2})_test\.csv$")
DECISION_FILE = re.compile(r"^decision_result_(?P<machine>.+)_section_(?P<section>\d{2})_test\.csv$")
GROUND_TRUTH_FILE = re.compile(r"^ground_truth_(?P<machine>.+)_section_(?P<section>\d{2})_test\.csv$")

_BINARY_WORDS = {
    "label": ("normal", "anomaly"),
    "domain": ("source", "target"),
    "decision": ("normal", "anomaly"),
}


def preview(names: Iterable[str], limit: int = 5) -> str:
    """``a, b, c (+N more)``: a readable excerpt of a long list of names for error messages."""
    names = list(names)
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def show_value(value) -> str:
    """A value as error messages show it: strings quoted, numbers plain (``nan``, not ``np.float64(nan)``)."""
    return repr(value) if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------------------------------
# Two-column result CSVs (file_name,value; no header): shared with the submission validator
# --------------------------------------------------------------------------------------------------


def parse_result_csv(text: str, source: str, value_kind: str) -> tuple[pd.DataFrame, list[str]]:
    """Parse ``file_name,value`` rows (no header) and return them with every problem found.

    ``value_kind``: ``"score"`` (a finite number) or ``"binary"`` (0 or 1). Problems name
    ``source`` and the line; rows with a problem are dropped from the returned frame (columns
    ``file_name``, ``value``, ``line``).
    """
    if value_kind not in ("score", "binary"):
        raise ValueError(f"value_kind must be 'score' or 'binary', got {value_kind!r}")
    problems: list[str] = []
    names, values, lines = [], [], []
    rows = list(csv.reader(io.StringIO(text)))
    if not any(rows):
        return pd.DataFrame({"file_name": [], "value": [], "line": []}), [f"{source}: the file is empty"]
    for line, row in enumerate(rows, start=1):
        if not row:
            continue
        if len(row) != 2:
            problems.append(f"{source} line {line}: expected 2 columns (file_name,value), found {len(row)}")
            continue
        name, raw = row[0].strip(), row[1].strip()
        if not name:
            problems.append(f"{source} line {line}: empty file name")
            continue
        try:
            value = float(raw)
        except ValueError:
            if line == 1:
                problems.append(
                    f"{source} line 1: {','.join(row)!r} looks like a header row; these CSVs have no header"
                )
            else:
                problems.append(f"{source} line {line}: value {raw!r} for {name} is not a number")
            continue
        if value_kind == "score" and not math.isfinite(value):
            problems.append(f"{source} line {line}: score {raw} for {name} is not finite")
            continue
        if value_kind == "binary" and value not in (0.0, 1.0):
            problems.append(f"{source} line {line}: value {raw} for {name} is not 0 or 1")
            continue
        names.append(name)
        values.append(int(value) if value_kind == "binary" else value)
        lines.append(line)
    frame = pd.DataFrame({"file_name": names, "value": values, "line": lines})
    repeated = frame[frame.duplicated("file_name", keep=False)]
    for name, group in repeated.groupby("file_name", sort=True):
        problems.append(
            f"{source}: file {name} is listed {len(group)} times (lines {preview(group['line'].tolist())})"
        )
    return frame.drop_duplicates("file_name"), problems


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text CSV ({error})") from error


def _read_result_csv(path: Path, value_kind: str) -> pd.DataFrame:
    text = _read_text(path)
    frame, problems = parse_result_csv(text, str(path), value_kind)
    if problems:
        more = f"\n... and {len(problems) - 10} more problems" if len(problems) > 10 else ""
        raise ValueError("\n".join(problems[:10]) + more)
    return frame.drop(columns="line")


# --------------------------------------------------------------------------------------------------
# Loading ground truth and scores
# --------------------------------------------------------------------------------------------------


def _matching_files(folder: Path, pattern: re.Pattern) -> dict[tuple[str, str], Path]:
    return {
        (match["machine"], match["section"]): path
        for path in sorted(folder.iterdir())
        if path.is_file() and (match := pattern.match(path.name))
    }


def _read_attribute_names(path: Path) -> pd.Series:
    """Evaluation name -> development-style name (``<second column>.wav``, as the evaluator maps it).

    Some organisers' files carry a third column (the name with concealed attributes); it is ignored.
    """
    rows = [row for row in csv.reader(io.StringIO(_read_text(path))) if row]
    short = [line for line, row in enumerate(rows, start=1) if len(row) < 2]
    if short:
        raise ValueError(f"{path} line {short[0]}: expected at least 2 columns (file_name,original_name)")
    names = pd.Series({row[0].strip(): row[1].strip() for row in rows})
    return names.where(names.str.endswith(".wav"), names + ".wav")


def load_ground_truth(gt_dir: str | os.PathLike) -> pd.DataFrame:
    """Read the organisers' ground truth: ``machine, section, file_name, label, domain`` (0/1).

    ``gt_dir`` holds ``ground_truth_data/`` (``file,1`` = anomaly) and ``ground_truth_domain/``
    (``file,1`` = target) with one ``ground_truth_<machine>_section_<XX>_test.csv`` per machine and
    section, and optionally ``ground_truth_attributes/`` (evaluation name -> development-style
    name), which adds an ``original_name`` column so scores written under the long names match too.
    """
    gt_dir = Path(gt_dir)
    data_dir, domain_dir, attribute_dir = (
        gt_dir / "ground_truth_data",
        gt_dir / "ground_truth_domain",
        gt_dir / "ground_truth_attributes",
    )
    for folder in (data_dir, domain_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ground-truth folder {folder} not found (expected the organisers' layout)"
            )
    label_files = _matching_files(data_dir, GROUND_TRUTH_FILE)
    if not label_files:
        raise FileNotFoundError(f"no ground_truth_<machine>_section_<XX>_test.csv files in {data_dir}")
    domain_files = _matching_files(domain_dir, GROUND_TRUTH_FILE)
    attribute_files = _matching_files(attribute_dir, GROUND_TRUTH_FILE) if attribute_dir.is_dir() else {}

    frames = []
    for (machine, section), label_path in label_files.items():
        if (machine, section) not in domain_files:
            raise FileNotFoundError(
                f"{domain_dir / label_path.name} not found: machine {machine} section {section} "
                "needs its domain ground truth"
            )
        labels = _read_result_csv(label_path, "binary").rename(columns={"value": "label"})
        domains = _read_result_csv(domain_files[(machine, section)], "binary").rename(
            columns={"value": "domain"}
        )
        merged = labels.merge(domains, on="file_name", how="outer", indicator=True)
        if (merged["_merge"] != "both").any():
            odd = merged.loc[merged["_merge"] != "both", "file_name"].tolist()
            raise ValueError(
                f"{label_path} and {domain_files[(machine, section)]} list different files: {preview(odd)}"
            )
        merged = merged.drop(columns="_merge")
        if (machine, section) in attribute_files:
            merged["original_name"] = merged["file_name"].map(
                _read_attribute_names(attribute_files[(machine, section)])
            )
        merged.insert(0, "section", section)
        merged.insert(0, "machine", machine)
        frames.append(merged)
    frame = pd.concat(frames, ignore_index=True)
    frame[["label", "domain"]] = frame[["label", "domain"]].astype(int)
    return frame


def load_score_dir(scores_dir: str | os.PathLike) -> pd.DataFrame:
    """Read official ``anomaly_score_<machine>_section_<XX>_test.csv`` files (no header).

    Returns ``machine, section, file_name, score`` and, when the folder holds
    ``decision_result_...`` files (then one for every score file), a 0/1 ``decision`` column.
    """
    scores_dir = Path(scores_dir)
    if not scores_dir.is_dir():
        raise FileNotFoundError(f"score folder {scores_dir} not found")
    score_files = _matching_files(scores_dir, SCORE_FILE)
    if not score_files:
        raise FileNotFoundError(f"no anomaly_score_<machine>_section_<XX>_test.csv files in {scores_dir}")
    decision_files = _matching_files(scores_dir, DECISION_FILE)
    if decision_files and set(decision_files) != set(score_files):
        missing = [
            f"decision_result_{m}_section_{s}_test.csv"
            for m, s in sorted(set(score_files) - set(decision_files))
        ]
        extra = [
            f"decision_result_{m}_section_{s}_test.csv"
            for m, s in sorted(set(decision_files) - set(score_files))
        ]
        raise ValueError(
            f"{scores_dir}: decision_result files must pair with the anomaly_score files; "
            f"missing: {preview(missing) or 'none'}; without scores: {preview(extra) or 'none'}"
        )
    frames = []
    for (machine, section), score_path in score_files.items():
        frame = _read_result_csv(score_path, "score").rename(columns={"value": "score"})
        if decision_files:
            decision_path = decision_files[(machine, section)]
            decisions = _read_result_csv(decision_path, "binary").rename(columns={"value": "decision"})
            merged = frame.merge(decisions, on="file_name", how="outer", indicator=True)
            if (merged["_merge"] != "both").any():
                odd = merged.loc[merged["_merge"] != "both", "file_name"].tolist()
                raise ValueError(f"{score_path} and {decision_path} list different files: {preview(odd)}")
            frame = merged.drop(columns="_merge")
        frame.insert(0, "section", section)
        frame.insert(0, "machine", machine)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["score"] = frame["score"].astype(float)
    if decision_files:
        frame["decision"] = frame["decision"].astype(int)
    return frame


def attach_ground_truth(scores: pd.DataFrame, ground_truth: pd.DataFrame) -> pd.DataFrame:
    """Add ``label`` and ``domain`` to ``scores`` by (machine, section, file name).

    Every ground-truth clip must be scored exactly once and every scored clip must be in the ground
    truth; a machine/section on one side only is an error too. Scores written under the
    development-style names of ``ground_truth_attributes`` are mapped to the evaluation names.
    """
    missing_columns = {"machine", "section", "file_name", "score"} - set(scores.columns)
    if missing_columns:
        raise ValueError(f"scores lack column(s) {sorted(missing_columns)}")
    scores = scores.drop(columns=[c for c in ("label", "domain") if c in scores.columns]).copy()
    scores["section"] = normalise_sections(scores["section"])
    truth = ground_truth.copy()
    truth["section"] = normalise_sections(truth["section"])
    keys = ["machine", "section", "file_name"]

    if "original_name" in truth.columns:
        # The evaluator accepts either name; map long names onto the short evaluation names.
        lookup = truth.dropna(subset=["original_name"]).set_index(["machine", "section", "original_name"])
        long_keys = pd.MultiIndex.from_frame(scores[keys])
        mapped = pd.Series(lookup["file_name"].reindex(long_keys).to_numpy(), index=scores.index)
        scores["file_name"] = mapped.fillna(scores["file_name"])

    repeated = scores[scores.duplicated(keys)]
    if not repeated.empty:
        first = repeated.iloc[0]
        raise ValueError(
            f"machine {first['machine']} section {first['section']}: file {first['file_name']} is scored "
            "more than once"
        )
    scored_sections = set(map(tuple, scores[["machine", "section"]].drop_duplicates().to_numpy()))
    truth_sections = set(map(tuple, truth[["machine", "section"]].drop_duplicates().to_numpy()))
    unknown = sorted(scored_sections - truth_sections)
    if unknown:
        raise ValueError(
            f"scores for {preview(f'{m} section {s}' for m, s in unknown)}, which the ground truth does not "
            f"hold (it has: {preview((f'{m} section {s}' for m, s in sorted(truth_sections)), limit=20)})"
        )
    unscored = sorted(truth_sections - scored_sections)
    if unscored:
        raise ValueError(
            f"no scores for {preview(f'{m} section {s}' for m, s in unscored)} of the ground truth"
        )

    merged = scores.merge(truth[[*keys, "label", "domain"]], on=keys, how="outer", indicator=True)
    for side, what in (("left_only", "not in the ground truth"), ("right_only", "missing from the scores")):
        odd = merged[merged["_merge"] == side]
        if not odd.empty:
            machine, section = odd.iloc[0][["machine", "section"]]
            names = odd.loc[(odd["machine"] == machine) & (odd["section"] == section), "file_name"]
            raise ValueError(
                f"machine {machine} section {section}: {len(names)} file(s) {what}: {preview(sorted(names))}"
            )
    merged = merged.drop(columns="_merge")
    merged[["label", "domain"]] = merged[["label", "domain"]].astype(int)
    return merged


def labels_from_file_names(scores: pd.DataFrame) -> pd.DataFrame:
    """Add 0/1 ``label`` and ``domain`` to ``scores`` from development test clip names.

    Development clips are named ``section_<XX>_<source|target>_test_<normal|anomaly>_<NNNN>_<attr>.wav``
    (``kit.data.parse_file_name``), so their score files carry their own ground truth. Raises
    ValueError naming the files when a name carries no label and domain (the evaluation names
    ``section_00_0000.wav``: those need the organisers' ground truth, ``load_ground_truth``), is a
    training clip, or belongs to another section than its score file.
    """
    from kit.data import DatasetError, parse_file_name  # here: kit.data imports torch

    missing_columns = {"machine", "section", "file_name", "score"} - set(scores.columns)
    if missing_columns:
        raise ValueError(f"scores lack column(s) {sorted(missing_columns)}")
    frame = scores.drop(columns=[c for c in ("label", "domain") if c in scores.columns]).copy()
    frame["section"] = normalise_sections(frame["section"])
    unlabelled, training, elsewhere, parsed = [], [], [], []
    for machine, section, name in zip(frame["machine"], frame["section"], frame["file_name"]):
        try:
            parts = parse_file_name(str(name))
        except DatasetError:  # not an official name at all: no label either
            parts = {"label": "unknown"}
        where = f"machine {machine} section {section}"
        if parts["label"] == "unknown":
            unlabelled.append((where, name))
        elif parts["split"] != "test":
            training.append((where, name))
        elif parts["section"] != section:
            elsewhere.append((where, name))
        parsed.append(parts)
    if unlabelled:
        where = unlabelled[0][0]
        names = [name for place, name in unlabelled if place == where]
        raise ValueError(
            f"{len(unlabelled)} scored file name(s) carry no label and domain ({where}: {preview(names)}); "
            "development test clips are named section_<XX>_<source|target>_test_<normal|anomaly>_<NNNN>_"
            "<attr>.wav, evaluation-set scores need the organisers' ground truth (--ground-truth GT_DIR)"
        )
    if training:
        where, name = training[0]
        raise ValueError(f"{where}: {name} is a training clip; score files list test clips only")
    if elsewhere:
        where, name = elsewhere[0]
        raise ValueError(f"{where}: {name} names another section than its score file")
    frame["label"] = [int(parts["label"] == "anomaly") for parts in parsed]
    frame["domain"] = [int(parts["domain"] == "target") for parts in parsed]
    return frame


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def normalise_sections(sections: pd.Series) -> pd.Series:
    """Section ids as two-digit strings: ``0``, ``"0"``, ``"00"`` and ``"section_00"`` become ``"00"``."""
    mapping = {}
    for value in pd.unique(sections):
        text = str(value).strip().removeprefix("section_")
        if not text.isdigit() or int(text) > 99:
            raise ValueError(f"section {value!r} is not a section id (expected 00-99)")
        mapping[value] = f"{int(text):02d}"
    return sections.map(mapping)


def _describe_row(frame: pd.DataFrame, index) -> str:
    row = frame.loc[index]
    return f"machine {row['machine']} section {row['section']} file {row['file_name']}"


def _binary_column(frame: pd.DataFrame, column: str) -> pd.Series:
    """Map a label/domain/decision column given as words, 0/1 or booleans onto 0/1 integers."""
    zero_word, one_word = _BINARY_WORDS[column]
    mapping = {zero_word: 0, one_word: 1, "0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
    mapped = frame[column].astype(str).str.strip().str.lower().map(mapping)
    bad = mapped.isna()
    if bad.any():
        index = bad.idxmax()
        raise ValueError(
            f"{column} must be {zero_word!r}/{one_word!r} or 0/1, got {show_value(frame.at[index, column])} "
            f"({_describe_row(frame, index)})"
        )
    return mapped.astype(int)


def normalise_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Check a score table and return it with 0/1 ``label``/``domain`` (and ``decision``), sorted.

    Raises ValueError, naming the machine, section and file, for a missing column, a NaN/inf or
    non-numeric score, an unknown label/domain/decision value or a clip listed twice.
    """
    missing = [column for column in SCORE_COLUMNS if column not in scores.columns]
    if missing:
        raise ValueError(f"scores lack column(s) {missing}; expected {list(SCORE_COLUMNS)}")
    if scores.empty:
        raise ValueError("scores are empty")
    frame = scores.reset_index(drop=True)
    frame["section"] = normalise_sections(frame["section"])
    numeric = pd.to_numeric(frame["score"], errors="coerce")
    bad = ~np.isfinite(numeric.to_numpy(dtype=float))
    if bad.any():
        index = frame.index[bad.argmax()]
        raise ValueError(
            f"score {show_value(frame.at[index, 'score'])} is not a finite number "
            f"({_describe_row(frame, index)}); {int(bad.sum())} such score(s) in all"
        )
    frame["score"] = numeric.astype(float)
    for column in ("label", "domain", "decision"):
        if column in frame.columns:
            frame[column] = _binary_column(frame, column)
    keys = ["machine", "section", "file_name"]
    repeated = frame.duplicated(keys)
    if repeated.any():
        index = frame.index[repeated.argmax()]
        raise ValueError(f"clip listed more than once: {_describe_row(frame, index)}")
    return frame.sort_values(keys, ignore_index=True)


def _floored_hmean(values) -> float:
    values = np.asarray(values, dtype=float).ravel()
    return float(scipy.stats.hmean(np.maximum(values, EPSILON)))


def official_score(values: Iterable[float]) -> float:
    """The official score: harmonic mean of a flat list of AUC(source), AUC(target) and pAUC values.

    Pass every AUC(source), AUC(target) and pAUC of every (machine, section) as one flat list (not
    per-machine means); each value is floored at machine epsilon so a zero AUC gives a tiny score
    instead of an error.
    """
    values = np.asarray(list(values), dtype=float).ravel()
    if values.size == 0:
        raise ValueError("official_score needs at least one AUC/pAUC value")
    if not np.isfinite(values).all():
        raise ValueError(f"official_score needs finite values, got {values[~np.isfinite(values)].tolist()}")
    return _floored_hmean(values)


def _decision_metrics(y_true: np.ndarray, decision: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall and F1 of 0/1 decisions, denominators floored at epsilon (as the evaluator)."""
    true_positive = float(np.sum((decision == 1) & (y_true == 1)))
    precision = true_positive / max(float(np.sum(decision == 1)), EPSILON)
    recall = true_positive / max(float(np.sum(y_true == 1)), EPSILON)
    f1 = 2.0 * precision * recall / max(precision + recall, EPSILON)
    return precision, recall, f1


def _one_section(group: pd.DataFrame, machine: str, section: str) -> dict[str, float]:
    where = f"machine {machine} section {section}"
    y_true = group["label"].to_numpy()
    y_score = group["score"].to_numpy()
    is_target = group["domain"].to_numpy() == 1
    if (y_true == 1).all() or (y_true == 0).all():
        only = "anomalous" if (y_true == 1).all() else "normal"
        raise ValueError(f"{where}: all {len(y_true)} clips are {only}; AUC needs normal and anomalous clips")
    values = {
        "n_clips": len(group),
        "auc_all": roc_auc_score(y_true, y_score),
        "pauc": roc_auc_score(y_true, y_score, max_fpr=MAX_FPR),
    }
    for domain, in_domain in (("source", ~is_target), ("target", is_target)):
        if not (in_domain & (y_true == 0)).any():
            raise ValueError(f"{where}: no {domain}-domain normal clips, so AUC({domain}) is undefined")
        mask = in_domain | (y_true == 1)
        values[f"auc_{domain}"] = roc_auc_score(y_true[mask], y_score[mask])
        if "decision" in group.columns:
            precision, recall, f1 = _decision_metrics(
                y_true[in_domain], group["decision"].to_numpy()[in_domain]
            )
            values |= {f"precision_{domain}": precision, f"recall_{domain}": recall, f"f1_{domain}": f1}
    return values | _means(
        [values["auc_source"], values["auc_target"], values["pauc"]],
        [values["auc_source"], values["auc_target"]],
    )


def section_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (machine, section): AUC(source), AUC(target), pAUC, their hmean and amean, ...

    Columns: ``machine, section, n_clips, auc_source, auc_target, pauc, hmean`` (floored harmonic
    mean of those three), ``amean``, ``auc_all`` (all clips), ``hmean_auc``/``amean_auc`` (of the
    two domain AUCs, the evaluator's per-machine "AUC" means) and, when ``scores`` has a
    ``decision`` column, ``precision_/recall_/f1_`` ``source``/``target``.
    """
    frame = normalise_scores(scores)
    rows = [
        {"machine": machine, "section": section, **_one_section(group, machine, section)}
        for (machine, section), group in frame.groupby(["machine", "section"], sort=True)
    ]
    columns = ["machine", "section", "n_clips", *SECTION_METRICS]
    if "decision" in frame.columns:
        columns += DECISION_METRICS
    return pd.DataFrame(rows, columns=columns)


def _aggregate(sections: pd.DataFrame) -> dict[str, float]:
    """Summarise section rows: per-metric harmonic means plus the flat hmean/amean of their values."""
    three = np.concatenate([sections[c].to_numpy(float) for c in ("auc_source", "auc_target", "pauc")])
    aucs = np.concatenate([sections[c].to_numpy(float) for c in ("auc_source", "auc_target")])
    values = {"n_clips": int(sections["n_clips"].sum())}
    for column in _PER_METRIC_HMEAN:
        if column in sections.columns:
            column_values = sections[column].to_numpy(float)
            values[column] = _floored_hmean(column_values) if np.isfinite(column_values).all() else np.nan
    return values | _means(three, aucs)


def _means(three, aucs) -> dict[str, float]:
    """The summary means of a section or of many: the official hmean (and amean) of every AUC(source),
    AUC(target) and pAUC value, and the means of the domain AUCs alone."""
    return {
        "hmean": official_score(three),
        "amean": float(np.mean(three)),
        "hmean_auc": _floored_hmean(aucs),
        "amean_auc": float(np.mean(aucs)),
    }


def results_table(per_system: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The results table of one or more systems, each given as a score table with labels.

    Rows, per system: one per (machine, section) (``level`` "section"), one per machine (``level``
    "machine", section "all") and one ``overall`` row (``level`` "overall"). In the aggregate rows
    ``auc_source``, ``auc_target``, ``pauc`` (and the other per-metric columns) hold the harmonic
    mean of the section values beneath, ``hmean`` the harmonic mean of the flat list of those
    sections' AUC(source), AUC(target) and pAUC values (in the overall row: the official score),
    ``amean`` their arithmetic mean, ``hmean_auc``/``amean_auc`` the means of the AUCs alone (the
    evaluator's "arithmetic mean" in its summary is the overall ``amean_auc``).
    """
    if not per_system:
        raise ValueError("results_table needs at least one system")
    blocks = []
    for system, scores in per_system.items():
        try:
            sections = section_metrics(scores)
        except ValueError as error:
            raise ValueError(f"system {system}: {error}") from error
        machines = [
            {"machine": machine, "section": ALL_SECTIONS, "level": "machine", **_aggregate(group)}
            for machine, group in sections.groupby("machine", sort=True)
        ]
        overall = {"machine": OVERALL, "section": ALL_SECTIONS, "level": "overall", **_aggregate(sections)}
        block = pd.concat(
            [sections.assign(level="section"), pd.DataFrame(machines), pd.DataFrame([overall])],
            ignore_index=True,
        )
        blocks.append(block.assign(system=system))
    table = pd.concat(blocks, ignore_index=True)
    metric_columns = [*SECTION_METRICS] + [c for c in DECISION_METRICS if c in table.columns]
    table = table[[*TABLE_KEY_COLUMNS, *metric_columns]]
    return table.astype({"n_clips": int})


def development_results(systems: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """``results_table`` of every system over its development test clips (the only labelled ones:
    training clips and the evaluation set are left out)."""
    return results_table(
        {name: s[(s["dataset"] == "dev") & (s["split"] == "test")] for name, s in systems.items()}
    )


def overall_scores(table: pd.DataFrame) -> dict[str, float]:
    """``{system: official score}`` from a results table."""
    overall = table[table["level"] == "overall"]
    return dict(zip(overall["system"], overall["hmean"].astype(float)))


def write_results(table: pd.DataFrame, run_dir: str | os.PathLike) -> Path:
    """Write ``table`` to ``run_dir/results.csv`` atomically (full float precision) and return the path."""
    path = Path(run_dir) / "results.csv"
    _write_table_csv(table, path)
    return path


def _write_table_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


def to_markdown(table: pd.DataFrame, columns: Iterable[str] | None = None, digits: int = 4) -> str:
    """Render ``table`` (or the given ``columns``) as a GitHub Markdown table; NaN shows as empty."""
    columns = list(columns) if columns is not None else list(table.columns)
    unknown = [column for column in columns if column not in table.columns]
    if unknown:
        raise ValueError(f"to_markdown: unknown column(s) {unknown}; the table has {list(table.columns)}")

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|")

    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in columns]
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|"
    body = [
        "| " + " | ".join(cell(value) for value in row) + " |"
        for row in table[columns].itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _system_dirs(scores_dir: Path, system: str | None) -> dict[str, Path]:
    """The systems to evaluate: ``scores_dir`` itself, or its sub-folders holding score files."""
    if not scores_dir.is_dir():
        raise FileNotFoundError(f"score folder {scores_dir} not found")
    if _matching_files(scores_dir, SCORE_FILE):
        return {system or scores_dir.name: scores_dir}
    systems = {
        folder.name: folder
        for folder in sorted(scores_dir.iterdir())
        if folder.is_dir() and _matching_files(folder, SCORE_FILE)
    }
    if not systems:
        raise FileNotFoundError(
            f"no anomaly_score_<machine>_section_<XX>_test.csv files in {scores_dir} or its sub-folders"
        )
    if system is not None:
        if system not in systems:
            raise FileNotFoundError(
                f"system {system!r} not found in {scores_dir} (it holds {sorted(systems)})"
            )
        return {system: systems[system]}
    return systems


def main(argv: list[str] | None = None, prog: str = "python -m kit.metrics") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Official metrics (AUC source/target, pAUC, official score) of official-format score\n"
        "files: anomaly_score_<machine>_section_<XX>_test.csv (and decision_result_...), no header.\n"
        "Development scores carry their labels and domains in the clip names; evaluation-set scores\n"
        "need the organisers' ground truth (--ground-truth).",
        epilog=f"""examples:
  {prog} runs/RUN/dev_scores                 # every system of a run (development set: labels from names)
  {prog} runs/RUN/dev_scores --system fusion --out fusion.csv
  {prog} runs/RUN/submission --ground-truth GT_DIR   # evaluation set: the organisers' ground truth
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scores_dir", type=Path, help="folder of anomaly_score_*.csv, or a folder of such system folders"
    )
    parser.add_argument(
        "--ground-truth",
        type=Path,
        help="organisers' ground-truth folder (ground_truth_data/, ground_truth_domain/, "
        "optionally ground_truth_attributes/); default: labels and domains from development file names",
    )
    parser.add_argument("--system", help="system name (single folder) or the one system to evaluate")
    parser.add_argument("--out", type=Path, help="write the full results table to this CSV")
    args = parser.parse_args(argv)
    try:
        ground_truth = load_ground_truth(args.ground_truth) if args.ground_truth is not None else None
        per_system = {}
        for name, folder in _system_dirs(args.scores_dir, args.system).items():
            try:
                scores = load_score_dir(folder)
                if ground_truth is None:
                    per_system[name] = labels_from_file_names(scores)
                else:
                    per_system[name] = attach_ground_truth(scores, ground_truth)
            except ValueError as error:
                raise ValueError(f"system {name} ({folder}): {error}") from error
        table = results_table(per_system)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source = args.ground_truth if args.ground_truth is not None else "the development file names"
    print(f"labels and domains: {source}\n")
    summary = table[table["level"] != "section"]
    print(to_markdown(summary, ["system", "machine", "auc_source", "auc_target", "pauc", "hmean", "amean"]))
    for name, score in overall_scores(table).items():
        print(f"official score ({name}): {score!r}")
    if args.out is not None:
        _write_table_csv(table, args.out)
        print(f"results -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
