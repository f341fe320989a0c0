"""DCASE Task 2 submissions: decision thresholds, system folders, the zip package and a validator.

A system folder ``<LastName>_<Institute>_task2_<1-4>/`` holds, per machine and section, the two
official CSVs without a header (``anomaly_score_<machine>_section_<XX>_test.csv``:
``file_name,score``; ``decision_result_<machine>_section_<XX>_test.csv``: ``file_name,0|1``) and
``<label>.meta.yaml``. The package is one zip of up to four system folders plus the technical
report. Folders and zips are written atomically and checked by the same validator a user runs
(``python -m kit.submission validate PATH``), so no half-written or malformed package is left.
Decisions follow the official baseline: a gamma distribution fitted to the anomaly scores of the
normal training clips, thresholded at its 0.9 quantile.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import scipy.stats
import yaml

from kit.files import atomic_path
from kit.metrics import DECISION_FILE, SCORE_FILE, normalise_sections, parse_result_csv, preview, show_value

LABEL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z-]*_[A-Za-z0-9][A-Za-z0-9-]*_task2_[1-4]$")
LABEL_FORM = "<LastName>_<Institute>_task2_<1-4>"
MAX_SYSTEMS = 4
MAX_ABBREVIATION = 10
DESCRIPTION_FIELDS = (
    "input_sampling_rate",
    "acoustic_features",
    "data_augmentation",
    "front_end",
    "embeddings",
    "machine_learning_method",
    "aggregation_method",
    "domain_adaptation_method",
    "domain_generalization_method",
    "ensemble_method_subsystem_count",
    "decision_making",
    "attribute_usage",
    "external_data_usage",
    "development_data_usage",
)
AUTHOR_FIELDS = ("lastname", "firstname", "email", "affiliation")
AFFILIATION_NAMES = (
    "institution",
    "institute",
)  # the 2026 example says institution, older templates institute
RESULT_FIELDS = ("auc_source", "auc_target", "pauc")
# Addresses reserved for documentation (RFC 2606): a meta file holding one still has a placeholder.
PLACEHOLDER_DOMAINS = re.compile(r"@(.+\.)?(example\.(com|org|net)|example|invalid|test|localhost)$", re.I)
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
AUTHORS_VARIABLE = "KIT_AUTHORS"


# --------------------------------------------------------------------------------------------------
# Thresholds and decisions
# --------------------------------------------------------------------------------------------------


def _finite_scores(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size < 2:
        raise ValueError(f"{what}: need at least 2 scores to fit a threshold, got {array.size}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: {int((~np.isfinite(array)).sum())} score(s) are NaN or infinite")
    return array


def gamma_threshold(train_scores, quantile: float = 0.9) -> float:
    """The official baseline's threshold: ``gamma.ppf(quantile)`` of ``gamma.fit(train_scores)``."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    scores = _finite_scores(train_scores, "gamma_threshold")
    if np.ptp(scores) == 0:
        raise ValueError(
            f"gamma_threshold: all {scores.size} training scores equal {scores[0]}; nothing to fit"
        )
    shape, loc, scale = scipy.stats.gamma.fit(scores)
    return float(scipy.stats.gamma.ppf(quantile, shape, loc=loc, scale=scale))


def percentile_threshold(train_scores, q: float = 90) -> float:
    """The ``q``-th percentile (0-100) of the training scores."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    return float(np.percentile(_finite_scores(train_scores, "percentile_threshold"), q))


def decide(scores, threshold: float) -> np.ndarray:
    """0/1 decisions: 1 (anomaly) where the score is above the threshold."""
    return (np.asarray(scores, dtype=float) > threshold).astype(int)


def fit_thresholds(train_scores: pd.DataFrame, method: str = "gamma", level: float = 0.9) -> dict:
    """``{(machine, section): threshold}`` from the normal training clips' scores.

    ``train_scores`` has columns ``machine, section, score``; ``method`` is ``"gamma"`` (``level``
    is the quantile, 0.9 as the baseline) or ``"percentile"`` (``level`` in percent).
    """
    fitters = {"gamma": gamma_threshold, "percentile": percentile_threshold}
    if method not in fitters:
        raise ValueError(f"unknown threshold method {method!r}; expected one of {sorted(fitters)}")
    missing = {"machine", "section", "score"} - set(train_scores.columns)
    if missing:
        raise ValueError(f"train_scores lack column(s) {sorted(missing)}")
    frame = train_scores.assign(section=normalise_sections(train_scores["section"]))
    thresholds = {}
    for (machine, section), group in frame.groupby(["machine", "section"], sort=True):
        try:
            thresholds[(machine, section)] = fitters[method](group["score"].to_numpy(), level)
        except ValueError as error:
            raise ValueError(f"machine {machine} section {section}: {error}") from error
    return thresholds


# --------------------------------------------------------------------------------------------------
# meta.yaml
# --------------------------------------------------------------------------------------------------


def meta_template() -> dict:
    """The full nested meta information of one system, with defaults; fill it and pass it on.

    Field names follow the DCASE 2026 Task 2 template as filled by participants (e.g.
    ``Kim_LUDO_task2_1.meta.yaml``); development results are percentages (64.58, not 0.6458)."""
    return {
        "submission": {
            "label": None,
            "name": None,
            "abbreviation": None,
            "authors": [],  # from the user's authors file (load_authors), never a placeholder
        },
        "system": {
            "description": {
                "input_sampling_rate": "16kHz",
                "acoustic_features": None,
                "data_augmentation": None,
                "front_end": None,
                "embeddings": None,
                "machine_learning_method": None,
                "aggregation_method": None,
                "domain_adaptation_method": None,
                "domain_generalization_method": None,
                "ensemble_method_subsystem_count": 1,
                "decision_making": None,
                "attribute_usage": None,
                "external_data_usage": None,
                "development_data_usage": "development",
            },
            "complexity": {"total_parameters": None},
            "external_datasets": [],
            "source_code": None,
        },
        # {machine: {auc_source, auc_target, pauc}} in percent
        "results": {"development_dataset": {}},
    }


def author_problems(authors, source: str) -> list[str]:
    """Every missing or placeholder field of a list of authors (the ``submission.authors`` field)."""
    if not isinstance(authors, list) or not authors:
        return [f"{source}: submission.authors must be a non-empty list (see load_authors)"]
    problems = []
    for number, author in enumerate(authors):
        where = f"{source}: submission.authors[{number}]"
        if not isinstance(author, Mapping):
            problems.append(f"{where} must be a mapping with {list(AUTHOR_FIELDS)}")
            continue
        problems += [f"{where}.{field} is missing" for field in AUTHOR_FIELDS if field not in author]
        problems += [
            f"{where}.{field} is empty"
            for field in ("lastname", "email")
            if not _is_filled(author.get(field))
        ]
        email = author.get("email")
        if _is_filled(email) and not EMAIL.match(email.strip()):
            problems.append(f"{where}.email {email!r} is not an e-mail address")
        elif _is_filled(email) and PLACEHOLDER_DOMAINS.search(email.strip()):
            problems.append(f"{where}.email {email!r} is a placeholder address (a reserved example domain)")
        affiliation = author.get("affiliation")
        if "affiliation" in author and not (
            isinstance(affiliation, Mapping)
            and any(_is_filled(affiliation.get(k)) for k in AFFILIATION_NAMES)
        ):
            problems.append(f"{where}.affiliation needs an institution")
    if not any(isinstance(a, Mapping) and a.get("corresponding") is True for a in authors):
        problems.append(f"{source}: no author is marked corresponding: true")
    return problems


def load_authors(source: str | os.PathLike | None = None) -> list[dict] | None:
    """The submission's authors from the user's own YAML file: ``source``, else the file named by
    the ``KIT_AUTHORS`` environment variable; None when neither is given.

    The file holds a list of authors (or ``{authors: [...]}``), each with ``lastname``, ``firstname``,
    ``email``, ``affiliation: {institution, department, location}`` and ``corresponding: true`` on
    one; ``authors.example.yaml`` in the repository shows the form. A missing file, malformed YAML or
    an incomplete or placeholder author is an error naming the file."""
    source = source or os.environ.get(AUTHORS_VARIABLE) or None
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"authors file {path} not found (from {AUTHORS_VARIABLE} or the authors parameter)"
        )
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"authors file {path} is not valid YAML: {error}") from error
    authors = content.get("authors") if isinstance(content, Mapping) else content
    if isinstance(authors, list) and len(authors) == 1 and isinstance(authors[0], Mapping):
        authors = [{"corresponding": True, **authors[0]}]  # a single author is the corresponding one
    problems = author_problems(authors, str(path))
    if problems:
        raise ValueError(f"authors file {path} is incomplete:\n" + "\n".join(problems))
    return [dict(author) for author in authors]


def _merge_meta(template: dict, given: Mapping, where: str = "") -> dict:
    """``given`` laid over ``template``; an unknown field (a typo) is an error, not silently kept."""
    merged = copy.deepcopy(template)
    for key, value in given.items():
        field = f"{where}.{key}" if where else str(key)
        if key not in template:
            raise ValueError(f"unknown meta field {field!r}; known fields here: {sorted(template)}")
        # Non-empty sub-dicts are merged field by field; lists and open mappings are replaced.
        if isinstance(template[key], dict) and template[key] and isinstance(value, Mapping):
            merged[key] = _merge_meta(template[key], value, field)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def development_results(table: pd.DataFrame, system: str | None = None) -> dict:
    """The ``results`` section of meta.yaml from a :func:`kit.metrics.results_table`: per machine,
    AUC(source), AUC(target) and pAUC in percent with two decimals, as the 2026 template has them."""
    if system is None:
        systems = table["system"].unique()
        if len(systems) != 1:
            raise ValueError(f"the table holds several systems {list(systems)}; name one")
        system = systems[0]
    rows = table[table["system"] == system]
    if rows.empty:
        raise ValueError(f"system {system!r} is not in the table (it has {list(table['system'].unique())})")
    machines = rows[rows["level"] == "machine"]
    results = {
        row.machine: {field: round(100.0 * float(getattr(row, field)), 2) for field in RESULT_FIELDS}
        for row in machines.itertuples(index=False)
    }
    return {"development_dataset": results}


def _is_filled(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _meta_problems(meta, label: str, source: str) -> list[str]:
    """Every missing or malformed official field of a parsed meta.yaml."""
    if not isinstance(meta, Mapping):
        return [
            f"{source}: expected a mapping with submission, system and results, got {type(meta).__name__}"
        ]
    problems = [
        f"{source}: missing field {key}" for key in ("submission", "system", "results") if key not in meta
    ]
    submission = meta.get("submission") or {}
    system = meta.get("system") or {}
    results = meta.get("results") or {}

    if "submission" in meta:
        if submission.get("label") != label:
            problems.append(f"{source}: submission.label is {submission.get('label')!r}, expected {label!r}")
        for field in ("name", "abbreviation"):
            if not _is_filled(submission.get(field)):
                problems.append(f"{source}: submission.{field} is missing or empty")
        abbreviation = submission.get("abbreviation")
        if _is_filled(abbreviation) and len(abbreviation) > MAX_ABBREVIATION:
            problems.append(
                f"{source}: submission.abbreviation {abbreviation!r} has more than "
                f"{MAX_ABBREVIATION} characters"
            )
        problems += author_problems(submission.get("authors"), source)

    if "system" in meta:
        description = system.get("description")
        if not isinstance(description, Mapping):
            problems.append(f"{source}: system.description is missing")
        else:
            problems += [
                f"{source}: missing field system.description.{field}"
                for field in DESCRIPTION_FIELDS
                if field not in description
            ]
            count = description.get("ensemble_method_subsystem_count")
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                problems.append(
                    f"{source}: system.description.ensemble_method_subsystem_count must be a whole number "
                    f">= 1 (the number of fused subsystems), got {count!r}"
                )
        complexity = system.get("complexity")
        if not isinstance(complexity, Mapping) or "total_parameters" not in complexity:
            problems.append(f"{source}: missing field system.complexity.total_parameters")
        elif complexity["total_parameters"] is not None and (
            not isinstance(complexity["total_parameters"], int) or complexity["total_parameters"] < 0
        ):
            problems.append(
                f"{source}: system.complexity.total_parameters must be a whole number, "
                f"got {complexity['total_parameters']!r}"
            )
        problems += [
            f"{source}: missing field system.{field}"
            for field in ("external_datasets", "source_code")
            if field not in system
        ]

    if "results" in meta:
        development = results.get("development_dataset")
        machines = development if isinstance(development, Mapping) else {}
        if not machines:
            problems.append(
                f"{source}: results.development_dataset needs per-machine auc_source, auc_target and pauc"
            )
        values_seen = []
        for machine, values in machines.items():
            for field in RESULT_FIELDS:
                value = values.get(field) if isinstance(values, Mapping) else None
                if not _is_number(value) or not 0.0 <= value <= 100.0:
                    problems.append(
                        f"{source}: results.development_dataset.{machine}.{field} must be a percentage "
                        f"in [0, 100], got {value!r}"
                    )
                else:
                    values_seen.append(value)
        if values_seen and max(values_seen) <= 1.0:
            problems.append(
                f"{source}: results.development_dataset values are all <= 1: they look like fractions, "
                "the template wants percentages (64.58, not 0.6458)"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# Writing a system folder and the zip
# --------------------------------------------------------------------------------------------------


def check_label(label: str) -> str:
    """Return ``label`` if it has the official form ``<LastName>_<Institute>_task2_<1-4>``."""
    if not isinstance(label, str) or not LABEL_PATTERN.match(label):
        raise ValueError(f"system label {label!r} does not match {LABEL_FORM} (e.g. Smith_UNI_task2_1)")
    return label


def score_csv_name(machine: str, section: str) -> str:
    return f"anomaly_score_{machine}_section_{section}_test.csv"


def decision_csv_name(machine: str, section: str) -> str:
    return f"decision_result_{machine}_section_{section}_test.csv"


def _checked_scores(scores: pd.DataFrame) -> pd.DataFrame:
    missing = {"machine", "section", "file_name", "score"} - set(scores.columns)
    if missing:
        raise ValueError(
            f"scores lack column(s) {sorted(missing)}; expected machine, section, file_name, score"
        )
    if scores.empty:
        raise ValueError("scores are empty")
    frame = scores[["machine", "section", "file_name", "score"]].copy()
    frame["section"] = normalise_sections(frame["section"])
    numeric = pd.to_numeric(frame["score"], errors="coerce")
    bad = ~np.isfinite(numeric.to_numpy(dtype=float))
    if bad.any():
        row = frame[bad].iloc[0]
        raise ValueError(
            f"score {show_value(row['score'])} of machine {row['machine']} section {row['section']} "
            f"file {row['file_name']} is not a finite number ({int(bad.sum())} such score(s))"
        )
    frame["score"] = numeric.astype(float)
    names = frame["file_name"].astype(str)
    unsafe = names.str.contains(r"[,\"\r\n]") | ~names.str.endswith(".wav")
    if unsafe.any():
        raise ValueError(
            f"file name {names[unsafe].iloc[0]!r} is not a plain .wav name (no commas, quotes, line breaks)"
        )
    repeated = frame.duplicated(["machine", "section", "file_name"])
    if repeated.any():
        row = frame[repeated].iloc[0]
        raise ValueError(
            f"machine {row['machine']} section {row['section']}: file {row['file_name']} is listed twice"
        )
    return frame


def _csv_bytes(names: Iterable[str], values: Iterable) -> bytes:
    # repr() of a Python float is its shortest exact form, so scores round-trip bit for bit; bytes
    # keep the "\n" line ends on every platform.
    return "".join(f"{name},{value!r}\n" for name, value in zip(names, values)).encode("utf-8")


def write_system(
    out_dir: str | os.PathLike,
    label: str,
    scores: pd.DataFrame,
    thresholds: Mapping[tuple[str, str], float],
    meta: Mapping,
) -> Path:
    """Write the system folder ``out_dir/label`` (CSVs + ``<label>.meta.yaml``) atomically.

    ``scores``: ``machine, section, file_name, score`` of the test clips; ``thresholds``:
    ``{(machine, section): threshold}`` (decision = score > threshold); ``meta``: fields laid over
    :func:`meta_template` (``submission.label`` is set from ``label``). The folder is built aside,
    validated, and only then moved into place, replacing an older one; on any error nothing changes.
    """
    check_label(label)
    frame = _checked_scores(scores)
    normalised_thresholds = {}
    for (machine, section), value in thresholds.items():
        section_id = normalise_sections(pd.Series([section])).iloc[0]
        normalised_thresholds[(machine, section_id)] = float(value)
    sections = sorted(set(map(tuple, frame[["machine", "section"]].drop_duplicates().to_numpy())))
    missing = [f"{m} section {s}" for m, s in sections if (m, s) not in normalised_thresholds]
    if missing:
        raise ValueError(f"no decision threshold for {preview(missing)}")
    not_finite = [f"{m} section {s}" for m, s in sections if not np.isfinite(normalised_thresholds[(m, s)])]
    if not_finite:
        raise ValueError(f"decision threshold of {preview(not_finite)} is not finite")
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a mapping laid over meta_template(), got {type(meta).__name__}")
    given_label = (meta.get("submission") or {}).get("label")
    if given_label not in (None, label):
        raise ValueError(f"meta submission.label {given_label!r} differs from the system label {label!r}")
    full_meta = _merge_meta(meta_template(), meta)
    full_meta["submission"]["label"] = label
    problems = _meta_problems(full_meta, label, f"meta of {label}")
    if problems:
        raise ValueError("incomplete meta information:\n" + "\n".join(problems))

    target = Path(out_dir) / label
    with atomic_path(target) as folder:
        folder.mkdir()
        _write_result_csvs(folder, frame, normalised_thresholds)
        _write_meta(folder / f"{label}.meta.yaml", full_meta)
        problems = _system_problems(label, _read_folder(folder), label, expected_files=None)
        if problems:
            raise ValueError(f"the written system {label} does not validate:\n" + "\n".join(problems))
    return target


def _write_result_csvs(
    folder: Path, frame: pd.DataFrame, thresholds: Mapping[tuple[str, str], float]
) -> None:
    """The two official CSVs of every (machine, section) of a checked score frame, in file-name order."""
    for (machine, section), group in frame.sort_values("file_name").groupby(["machine", "section"]):
        names = group["file_name"].tolist()
        values = group["score"].to_numpy(dtype=float)
        decisions = decide(values, thresholds[(machine, section)])
        (folder / score_csv_name(machine, section)).write_bytes(_csv_bytes(names, values.tolist()))
        (folder / decision_csv_name(machine, section)).write_bytes(_csv_bytes(names, decisions.tolist()))


def write_development_files(
    out_dir: str | os.PathLike,
    systems: Mapping[str, pd.DataFrame],
    *,
    threshold: str = "gamma",
    level: float = 0.9,
) -> dict[str, Path]:
    """Every system's development test scores and decisions in the official format, one folder per
    system (``out_dir/<system>/anomaly_score_<machine>_section_<XX>_test.csv``, ``decision_result_...``,
    no header), so the organisers' evaluator and ``python -m kit.metrics out_dir`` can score them.
    Decisions use thresholds fitted on the development machines' normal training clips, as for the
    submission. Each folder is written atomically; returns ``{system: folder}``."""
    written = {}
    for name, scores in systems.items():
        development = scores[scores["dataset"] == "dev"]
        test, train = (
            development[development["split"] == "test"],
            development[development["split"] == "train"],
        )
        if test.empty:
            raise ValueError(f"system {name!r} has no development test scores (dataset 'dev', split 'test')")
        if train.empty:
            raise ValueError(
                f"system {name!r} has no scores of development training clips to fit thresholds on"
            )
        frame = _checked_scores(test)
        thresholds = fit_thresholds(train[train["label"] == "normal"], threshold, level)
        with atomic_path(Path(out_dir) / name) as folder:
            folder.mkdir()
            _write_result_csvs(folder, frame, thresholds)
        written[name] = Path(out_dir) / name
    return written


def system_meta(
    description: Mapping,
    *,
    authors: list[dict],
    subsystems: int,
    parameters: int | None,
) -> dict:
    """The meta fields of one system laid over :func:`meta_template`: ``description`` (the recipe's
    ``submission``/``system`` fields), the authors, the number of fused subsystems and the total
    parameter count of the models it uses. The results are filled by :func:`submit_system`."""
    meta = _merge_meta(meta_template(), description)
    meta["submission"]["authors"] = copy.deepcopy(authors)
    meta["system"]["description"]["ensemble_method_subsystem_count"] = int(subsystems)
    meta["system"]["complexity"]["total_parameters"] = None if parameters is None else int(parameters)
    return meta


def submit_system(
    out_dir: str | os.PathLike,
    label: str,
    scores: pd.DataFrame,
    results: pd.DataFrame,
    system: str,
    meta: Mapping,
    *,
    threshold: str = "gamma",
    level: float = 0.9,
) -> Path:
    """One system's submission from a run's scores (the scores contract of ``kit.scoring``).

    The evaluation test clips (``dataset == "eval"``, ``split == "test"``) are submitted; decision
    thresholds are fit on the scores of the evaluation machines' normal training clips (scored
    leave-one-out), as the official baseline does; the development results in the meta file come
    from ``results`` (a :func:`kit.metrics.results_table`) for ``system``.
    """
    evaluation = scores[scores["dataset"] == "eval"]
    test, train = evaluation[evaluation["split"] == "test"], evaluation[evaluation["split"] == "train"]
    if test.empty:
        raise ValueError(
            f"system {system!r} has no evaluation test scores (dataset 'eval', split 'test') to submit"
        )
    if train.empty:
        raise ValueError(f"system {system!r} has no scores of evaluation training clips to fit thresholds on")
    full_meta = _merge_meta(meta_template(), meta)
    full_meta["results"] = development_results(results, system)
    return write_system(out_dir, label, test, fit_thresholds(train, threshold, level), full_meta)


def evaluation_test_files(index: pd.DataFrame) -> dict[str, list[str]]:
    """``{machine: [evaluation test file names]}`` of an index (empty before the evaluation set is out)."""
    test = index[(index["dataset"] == "eval") & (index["split"] == "test")]
    return {machine: sorted(group["file_name"]) for machine, group in test.groupby("machine")}


def submit_run(
    out_dir: str | os.PathLike,
    systems: Mapping[str, pd.DataFrame],
    results: pd.DataFrame,
    submit: Mapping[str, str],
    *,
    index: pd.DataFrame,
    descriptions: Mapping,
    authors: list[dict] | None,
    resources: Mapping[str, tuple[int, int | None]],
    zip_path: str | os.PathLike,
    threshold: str = "gamma",
    level: float = 0.9,
) -> dict:
    """Package a run's submission: one system folder per ``label -> system`` of ``submit`` and the zip,
    validated against the evaluation test clips of ``index``. ``descriptions`` holds the recipe's
    meta fields (``submission.name``, ``system.description...``), shared, or per label
    (``{label: {...}}``); ``resources[system]`` is ``(subsystems, total parameters)``.

    Returns what was done, for the run manifest: ``{"zip": path, "systems": {...}}``, or
    ``{"skipped": reason}`` when the dataset has no evaluation test clips yet or no authors are given
    (nothing is written then)."""
    expected = evaluation_test_files(index)
    if not expected:
        return {
            "skipped": "the dataset has no evaluation test clips (eval_data/raw/<machine>/test): "
            "development results only; the submission is packaged once the evaluation set is there"
        }
    if not authors:
        return {
            "skipped": f"no authors: write an authors file (see authors.example.yaml) and set "
            f"{AUTHORS_VARIABLE}=path/to/authors.yaml, then run notebook 10 again (./run_all.sh RECIPE --only 10)"
        }
    missing = sorted(set(submit.values()) - set(systems))
    if missing:
        raise KeyError(f"cannot submit {missing}: no such scored system; scored systems: {sorted(systems)}")
    if len(submit) > MAX_SYSTEMS:
        raise ValueError(f"{len(submit)} systems to submit; at most {MAX_SYSTEMS} per team")
    # Built aside and moved into place whole: no system folder of an earlier packaging with other
    # labels can slip into the zip, and a failure leaves the previous submission as it was.
    with atomic_path(out_dir) as folder:
        folder.mkdir()
        for label, system in submit.items():
            description = descriptions.get(label, descriptions)
            subsystems, parameters = resources[system]
            meta = system_meta(description, authors=authors, subsystems=subsystems, parameters=parameters)
            submit_system(
                folder, label, systems[system], results, system, meta, threshold=threshold, level=level
            )
        problems = validate(folder, expected_files=expected)
        if problems:
            raise ValueError("the submission does not validate:\n" + "\n".join(problems))
        zipped = make_zip(folder, zip_path)
    return {"zip": str(Path(zipped).absolute()), "systems": dict(submit)}


def _write_meta(path: Path, meta: dict) -> None:
    path.write_bytes(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).encode("utf-8"))


def make_zip(
    submission_dir: str | os.PathLike,
    zip_path: str | os.PathLike,
    report_pdf: str | os.PathLike | None = None,
) -> Path:
    """Zip the validated system folders of ``submission_dir`` (and the technical report) atomically.

    ``submission_dir`` holds the system folders (or is one). The zip is validated before it
    replaces ``zip_path``; an invalid submission raises ValueError and leaves any old zip intact.
    """
    submission_dir = Path(submission_dir)
    assert_valid(submission_dir)
    files = _read_folder(submission_dir)
    if any(PurePosixPath(name).parent == PurePosixPath(".") and _is_system_file(name) for name in files):
        # A single system folder: keep its name as the folder inside the zip.
        files = {f"{submission_dir.name}/{name}": data for name, data in files.items()}
    if report_pdf is not None:
        report_pdf = Path(report_pdf)
        if not report_pdf.is_file():
            raise FileNotFoundError(f"technical report {report_pdf} not found")
        if report_pdf.suffix.lower() != ".pdf":
            raise ValueError(f"technical report {report_pdf} is not a .pdf file")
        files[report_pdf.name] = report_pdf.read_bytes()
    zip_path = Path(zip_path)
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(files):
                # A fixed timestamp makes the same submission give the same bytes.
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, files[name])
        problems = validate(tmp)
        if problems:
            raise ValueError(f"the written zip {zip_path} does not validate:\n" + "\n".join(problems))
    return zip_path


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def _is_system_file(name: str) -> bool:
    base = PurePosixPath(name).name
    return bool(SCORE_FILE.match(base) or DECISION_FILE.match(base) or base.endswith(".meta.yaml"))


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not _is_hidden(path.relative_to(folder).as_posix())
    }


def _read_zip(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {
            info.filename: archive.read(info)
            for info in archive.infolist()
            if not info.is_dir() and not _is_hidden(info.filename)
        }


def _system_problems(
    label: str, files: Mapping[str, bytes], prefix: str, expected_files: Mapping[str, list[str]] | None
) -> list[str]:
    """Problems of one system folder; ``files`` maps names inside the folder to their bytes."""
    problems = []
    if not LABEL_PATTERN.match(label):
        problems.append(f"{prefix}: folder name {label!r} does not match {LABEL_FORM}")
    score_files, decision_files, naming = _classify_files(label, files, prefix)
    problems += naming + _meta_file_problems(label, files, prefix)
    if not score_files and not decision_files:
        problems.append(f"{prefix}: no anomaly_score_<machine>_section_<XX>_test.csv files")
    for key in sorted(set(score_files) - set(decision_files)):
        problems.append(f"{prefix}: missing file {decision_csv_name(*key)}")
    for key in sorted(set(decision_files) - set(score_files)):
        problems.append(f"{prefix}: missing file {score_csv_name(*key)}")
    clips, content = _listed_clips(files, score_files, decision_files, prefix)
    problems += content
    if expected_files is not None:
        problems += _test_set_problems(clips, expected_files, prefix)
    return problems


def _classify_files(label: str, files: Mapping[str, bytes], prefix: str):
    """``(score CSVs, decision CSVs, problems)``: the CSVs by (machine, section), and every file
    that is neither a result CSV, the meta file nor the report."""
    meta_name = f"{label}.meta.yaml"
    score_files, decision_files, problems = {}, {}, []
    for name in sorted(files):
        if match := SCORE_FILE.match(name):
            score_files[(match["machine"], match["section"])] = name
        elif match := DECISION_FILE.match(name):
            decision_files[(match["machine"], match["section"])] = name
        elif name.endswith(".meta.yaml") and name != meta_name:
            problems.append(f"{prefix}/{name}: the meta file must be named {meta_name}")
        elif name != meta_name and not name.lower().endswith(".pdf"):
            problems.append(
                f"{prefix}/{name}: unexpected file (expected anomaly_score_<machine>_section_<XX>_test.csv, "
                f"decision_result_<machine>_section_<XX>_test.csv and {meta_name})"
            )
    return score_files, decision_files, problems


def _meta_file_problems(label: str, files: Mapping[str, bytes], prefix: str) -> list[str]:
    meta_name = f"{label}.meta.yaml"
    if meta_name not in files:
        return [f"{prefix}: missing file {meta_name}"]
    try:
        meta = yaml.safe_load(files[meta_name].decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        return [f"{prefix}/{meta_name}: not valid YAML ({error})"]
    return _meta_problems(meta, label, f"{prefix}/{meta_name}")


def _listed_clips(files, score_files, decision_files, prefix: str):
    """``({(machine, section): {"scores": names, "decisions": names}}, problems)``: each CSV parsed
    and checked (two columns, no header, finite scores, 0/1 decisions, its own section's clips), and
    the two CSVs of a section compared."""
    problems = []
    clips: dict[tuple[str, str], dict[str, set[str]]] = {}
    for kind, found, value_kind in (
        ("scores", score_files, "score"),
        ("decisions", decision_files, "binary"),
    ):
        for (machine, section), name in found.items():
            source = f"{prefix}/{name}"
            try:
                text = files[name].decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{source}: not a UTF-8 text CSV")
                continue
            table, csv_problems = parse_result_csv(text, source, value_kind)
            problems += csv_problems
            names = set(table["file_name"])
            foreign = sorted(
                n for n in names if n.startswith("section_") and not n.startswith(f"section_{section}_")
            )
            if foreign:
                problems.append(f"{source}: {len(foreign)} file(s) of another section: {preview(foreign)}")
            clips.setdefault((machine, section), {})[kind] = names
    for (machine, section), both in sorted(clips.items()):
        if len(both) == 2 and both["scores"] != both["decisions"]:
            only_scores = preview(sorted(both["scores"] - both["decisions"])) or "none"
            only_decisions = preview(sorted(both["decisions"] - both["scores"])) or "none"
            problems.append(
                f"{prefix}: {score_csv_name(machine, section)} and {decision_csv_name(machine, section)} "
                f"list different files; only in scores: {only_scores}; only in decisions: {only_decisions}"
            )
    return clips, problems


def _test_set_problems(clips, expected_files: Mapping[str, list[str]], prefix: str) -> list[str]:
    """Every machine of the test set present, no other, and exactly its test clips in each CSV."""
    problems = []
    machines = {machine for machine, _ in clips}
    for machine in sorted(set(expected_files) - machines):
        problems.append(
            f"{prefix}: missing files for machine {machine} "
            f"({score_csv_name(machine, '<XX>')} and {decision_csv_name(machine, '<XX>')})"
        )
    for machine in sorted(machines - set(expected_files)):
        problems.append(
            f"{prefix}: machine {machine} is not in the test set (expected {sorted(expected_files)})"
        )
    for (machine, section), both in sorted(clips.items()):
        if machine not in expected_files:
            continue
        expected = set(expected_files[machine])
        # Evaluation names carry their section: a section's CSV lists that section's clips.
        wanted = {n for n in expected if not n.startswith("section_") or n.startswith(f"section_{section}_")}
        for kind, names in both.items():
            csv_name = (score_csv_name if kind == "scores" else decision_csv_name)(machine, section)
            if wanted - names:
                problems.append(
                    f"{prefix}/{csv_name}: {len(wanted - names)} test clip(s) of {machine} missing: "
                    f"{preview(sorted(wanted - names))}"
                )
            if names - expected:
                problems.append(
                    f"{prefix}/{csv_name}: {len(names - expected)} file(s) not in the test set of "
                    f"{machine}: {preview(sorted(names - expected))}"
                )
    return problems


def validate(path: str | os.PathLike, expected_files: Mapping[str, list[str]] | None = None) -> list[str]:
    """Every problem of a submission folder, a single system folder or a zip; empty when valid.

    Checks the file names, that both CSVs exist per machine/section without a header, two columns,
    each clip once, finite scores, 0/1 decisions, the same clips in both CSVs (and exactly the
    clips of ``expected_files`` ``{machine: [test file names]}`` when given), and each system's
    label and ``<label>.meta.yaml`` with the official fields.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"submission {path} not found")
    if path.is_dir():
        files = _read_folder(path)
    elif zipfile.is_zipfile(path):
        try:
            files = _read_zip(path)
        except (zipfile.BadZipFile, OSError) as error:
            return [f"{path}: unreadable zip ({error})"]
    else:
        return [f"{path}: neither a folder nor a zip file"]

    # A system folder is any folder holding a system file; other files there are judged with it.
    system_folders = {str(PurePosixPath(name).parent) for name in files if _is_system_file(name)}
    systems: dict[str, dict[str, bytes]] = {folder: {} for folder in system_folders}
    problems = []
    for name, data in files.items():
        parent = str(PurePosixPath(name).parent)
        if parent in systems:
            systems[parent][PurePosixPath(name).name] = data
        elif not name.lower().endswith(".pdf"):
            problems.append(
                f"{path}/{name}: unexpected file (only system folders and the report belong here)"
            )
    if not systems:
        return problems + [f"{path}: no system folder (with <label>.meta.yaml and the CSVs) found"]
    if len(systems) > MAX_SYSTEMS:
        problems.append(f"{path}: {len(systems)} systems; at most {MAX_SYSTEMS} per team")
    for folder, system_files in sorted(systems.items()):
        label = PurePosixPath(folder).name if folder != "." else (path.name if path.is_dir() else path.stem)
        prefix = str(path / folder) if folder != "." else str(path)
        problems += _system_problems(label, system_files, prefix, expected_files)
    return problems


def assert_valid(path: str | os.PathLike, expected_files: Mapping[str, list[str]] | None = None) -> None:
    """Raise ValueError listing every problem of :func:`validate`."""
    problems = validate(path, expected_files)
    if problems:
        raise ValueError(f"submission {path} has {len(problems)} problem(s):\n" + "\n".join(problems))


def expected_test_files(raw_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``{machine: [test file names]}`` from ``<raw_dir>/<machine>/test/*.wav`` (e.g. eval_data/raw)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"test data folder {raw_dir} not found")
    expected = {
        folder.name: sorted(p.name for p in (folder / "test").glob("*.wav"))
        for folder in sorted(raw_dir.iterdir())
        if (folder / "test").is_dir()
    }
    if not any(expected.values()):
        raise FileNotFoundError(f"no <machine>/test/*.wav files under {raw_dir}")
    return expected


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str = "python -m kit.submission") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="check a submission folder, system folder or zip")
    check.add_argument("path", type=Path)
    check.add_argument(
        "--test-dir", type=Path, help="eval_data/raw: require exactly its <machine>/test clips"
    )
    pack = commands.add_parser("zip", help="zip a validated submission folder (and the report)")
    pack.add_argument("submission_dir", type=Path)
    pack.add_argument("zip_path", type=Path)
    pack.add_argument("--report", type=Path, help="technical report (.pdf)")
    args = parser.parse_args(argv)
    try:
        if args.command == "zip":
            print(f"wrote {make_zip(args.submission_dir, args.zip_path, args.report)}")
            return 0
        expected = expected_test_files(args.test_dir) if args.test_dir else None
        problems = validate(args.path, expected)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"- {problem}", file=sys.stderr)
        return 1
    print(f"{args.path}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
