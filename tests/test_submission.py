"""Tests for kit.submission: thresholds, the written files, the zip, the validator and atomicity."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import yaml

from kit import submission
from kit.metrics import results_table
from kit.submission import (
    assert_valid,
    decide,
    development_results,
    expected_test_files,
    fit_thresholds,
    gamma_threshold,
    make_zip,
    meta_template,
    percentile_threshold,
    validate,
    write_system,
)

REPO = Path(__file__).resolve().parents[1]
LABEL = "Smith_UNI_task2_1"
MACHINES = ("Sander", "ToyDrone")
CLIPS = [f"section_00_{i:04d}.wav" for i in range(5)]
EXPECTED = {machine: CLIPS for machine in MACHINES}


def make_scores(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        [(machine, "00", name) for machine in MACHINES for name in CLIPS],
        columns=["machine", "section", "file_name"],
    )
    return frame.assign(score=rng.normal(size=len(frame)))


AUTHOR = {
    "lastname": "Smith",
    "firstname": "Ann",
    "email": "ann.smith@uni-hamburg.de",
    "corresponding": True,
    "affiliation": {
        "institution": "University of Hamburg",
        "department": None,
        "location": "Hamburg, Germany",
    },
}


def filled_meta() -> dict:
    meta = meta_template()
    meta["submission"].update(name="Fine-tuned BEATs + KNN", abbreviation="BEATsKNN")
    meta["submission"]["authors"] = [copy.deepcopy(AUTHOR)]
    meta["system"]["description"]["machine_learning_method"] = "KNN"
    meta["results"]["development_dataset"] = {"fan": {"auc_source": 71.0, "auc_target": 62.0, "pauc": 55.0}}
    return meta


THRESHOLDS = {(machine, "00"): 0.0 for machine in MACHINES}


@pytest.fixture()
def system(tmp_path) -> Path:
    """A valid system folder inside ``tmp_path / "submission"``."""
    return write_system(tmp_path / "submission", LABEL, make_scores(), THRESHOLDS, filled_meta())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------


def test_gamma_threshold_is_scipys_fit_and_ppf():
    train = np.random.default_rng(1).gamma(shape=3.0, scale=2.0, size=400) + 5.0
    shape, loc, scale = scipy.stats.gamma.fit(train)
    assert gamma_threshold(train) == scipy.stats.gamma.ppf(0.9, shape, loc=loc, scale=scale)
    assert gamma_threshold(train, quantile=0.5) < gamma_threshold(train)


def test_percentile_threshold_and_decisions():
    train = np.arange(101, dtype=float)
    assert percentile_threshold(train) == 90.0
    assert percentile_threshold(train, q=50) == 50.0
    # Strictly above the threshold is an anomaly.
    assert decide([89.0, 90.0, 90.5], 90.0).tolist() == [0, 0, 1]
    assert decide([1.0], 0.0).dtype.kind == "i"


def test_fit_thresholds_per_machine_and_section():
    train = pd.DataFrame(
        {
            "machine": ["a"] * 50 + ["b"] * 50,
            "section": [0] * 100,
            "score": np.r_[np.arange(50), np.arange(50) * 2.0],
        }
    )
    thresholds = fit_thresholds(train, method="percentile", level=90)
    assert thresholds == {
        ("a", "00"): np.percentile(np.arange(50), 90),
        ("b", "00"): np.percentile(np.arange(50) * 2, 90),
    }
    assert set(fit_thresholds(train)) == {("a", "00"), ("b", "00")}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: gamma_threshold([1.0, np.nan, 2.0]), "1 score\\(s\\) are NaN or infinite"),
        (lambda: gamma_threshold([1.0]), "at least 2 scores"),
        (lambda: gamma_threshold([2.0, 2.0, 2.0]), "all 3 training scores equal 2.0"),
        (lambda: gamma_threshold([1.0, 2.0], quantile=1.5), "quantile must lie in \\(0, 1\\)"),
        (lambda: percentile_threshold([1.0, 2.0], q=150), "q must lie in \\[0, 100\\]"),
        (
            lambda: fit_thresholds(pd.DataFrame({"machine": ["a"], "section": ["00"], "score": [1.0]})),
            "machine a section 00: .*at least 2 scores",
        ),
        (lambda: fit_thresholds(pd.DataFrame({"machine": ["a"]}), "gamma"), "lack column"),
        (lambda: fit_thresholds(pd.DataFrame(), "median"), "unknown threshold method 'median'"),
    ],
)
def test_threshold_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def test_round_trip_write_validate_zip(system, tmp_path):
    submission_dir = system.parent
    assert validate(submission_dir) == []
    assert validate(system, EXPECTED) == []
    report = tmp_path / "Smith_UNI_task2.technical_report.pdf"
    report.write_bytes(b"%PDF-1.4 report")
    zip_path = make_zip(submission_dir, tmp_path / "submissions" / "Smith_UNI_task2.zip", report)
    assert validate(zip_path, EXPECTED) == []
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        assert report.name in names
        assert f"{LABEL}/{LABEL}.meta.yaml" in names
        assert f"{LABEL}/anomaly_score_Sander_section_00_test.csv" in names
        written = archive.read(f"{LABEL}/anomaly_score_Sander_section_00_test.csv")
    assert written == (system / "anomaly_score_Sander_section_00_test.csv").read_bytes()
    # The same submission zips to the same bytes.
    again = make_zip(submission_dir, tmp_path / "again.zip", report)
    assert again.read_bytes() == zip_path.read_bytes()
    assert leftovers(zip_path.parent) == []


def test_zip_of_a_single_system_folder_keeps_its_name(system, tmp_path):
    zip_path = make_zip(system, tmp_path / "one.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert all(name.startswith(f"{LABEL}/") for name in archive.namelist())
    assert validate(zip_path) == []


def test_csv_byte_layout(tmp_path):
    scores = pd.DataFrame(
        {
            "machine": ["fan"] * 3,
            "section": ["00"] * 3,
            "file_name": ["section_00_0002.wav", "section_00_0000.wav", "section_00_0001.wav"],
            "score": [1e-20, 0.12345678901234568, -3.0],
        }
    )
    folder = write_system(tmp_path, LABEL, scores, {("fan", "00"): 0.1}, filled_meta())
    score_bytes = (folder / "anomaly_score_fan_section_00_test.csv").read_bytes()
    assert score_bytes == (
        b"section_00_0000.wav,0.12345678901234568\nsection_00_0001.wav,-3.0\nsection_00_0002.wav,1e-20\n"
    )
    decision_bytes = (folder / "decision_result_fan_section_00_test.csv").read_bytes()
    assert decision_bytes == b"section_00_0000.wav,1\nsection_00_0001.wav,0\nsection_00_0002.wav,0\n"
    # Full precision: the scores read back bit for bit.
    back = pd.read_csv(folder / "anomaly_score_fan_section_00_test.csv", header=None)
    assert back[1].tolist() == [0.12345678901234568, -3.0, 1e-20]


def test_meta_yaml_holds_every_official_field(system):
    meta = yaml.safe_load((system / f"{LABEL}.meta.yaml").read_text())
    assert meta["submission"]["label"] == LABEL
    assert meta["submission"]["authors"] == [AUTHOR]
    assert set(meta["system"]["description"]) == set(submission.DESCRIPTION_FIELDS)
    assert meta["system"]["description"]["machine_learning_method"] == "KNN"
    assert meta["system"]["description"]["input_sampling_rate"] == "16kHz"
    assert {"complexity", "external_datasets", "source_code"} <= set(meta["system"])
    assert meta["results"]["development_dataset"]["fan"] == {
        "auc_source": 71.0,
        "auc_target": 62.0,
        "pauc": 55.0,
    }


def test_development_results_come_from_a_results_table(tmp_path):
    rows = [(0.1, 0, 0), (0.2, 0, 1), (0.9, 1, 0), (0.3, 1, 1), (0.05, 0, 1)]
    frame = pd.DataFrame(rows, columns=["score", "label", "domain"]).assign(
        machine="fan", section="00", file_name=[f"c{i}.wav" for i in range(len(rows))]
    )
    table = results_table({LABEL: frame})
    results = development_results(table)
    machine = table[table["level"] == "machine"].iloc[0]
    assert results["development_dataset"] == {  # percent with two decimals, as the 2026 template
        "fan": {field: round(100 * machine[field], 2) for field in ("auc_source", "auc_target", "pauc")}
    }
    meta = filled_meta() | {"results": results}
    assert validate(write_system(tmp_path, LABEL, make_scores(), THRESHOLDS, meta)) == []
    with pytest.raises(ValueError, match="several systems"):
        development_results(pd.concat([table, table.assign(system="other")]))


@pytest.mark.parametrize(
    ("label", "scores", "thresholds", "meta", "message"),
    [
        (
            "Smith_task2_1",
            None,
            None,
            None,
            r"label 'Smith_task2_1' does not match <LastName>_<Institute>_task2_<1-4>",
        ),
        ("Smith_UNI_task2_5", None, None, None, "does not match"),
        ("Smith_UNI_task1_1", None, None, None, "does not match"),
        (
            LABEL,
            lambda s: s.assign(score=s["score"].where(s.index != 7, np.nan)),
            None,
            None,
            r"score nan of machine ToyDrone section 00 file section_00_0002.wav is not a finite number",
        ),
        (
            LABEL,
            lambda s: s.assign(score=s["score"].astype(object).where(s.index != 1, "high")),
            None,
            None,
            r"score 'high' .* file section_00_0001.wav",
        ),
        (
            LABEL,
            lambda s: pd.concat([s, s.iloc[[3]]]),
            None,
            None,
            "file section_00_0003.wav is listed twice",
        ),
        (
            LABEL,
            lambda s: s.assign(file_name=s["file_name"].str.replace(".wav", ",x.wav")),
            None,
            None,
            "not a plain .wav name",
        ),
        (LABEL, lambda s: s.drop(columns="score"), None, None, r"lack column\(s\) \['score'\]"),
        (LABEL, None, {("Sander", "00"): 0.0}, None, "no decision threshold for ToyDrone section 00"),
        (
            LABEL,
            None,
            {("Sander", "00"): 0.0, ("ToyDrone", 0): np.inf},
            None,
            "threshold of ToyDrone section 00 is not finite",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["system"]["description"].update(front_ned="x"),
            "unknown meta field 'system.description.front_ned'",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["submission"]["authors"][0].update(email=None),
            r"submission.authors\[0\].email is empty",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["submission"].update(abbreviation="MuchTooLongName"),
            "more than 10 characters",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["submission"].update(label="Other_UNI_task2_1"),
            "differs from the system label",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["results"].update(development_dataset={}),
            "needs per-machine auc_source",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["results"]["development_dataset"]["fan"].update(pauc=101.5),
            r"development_dataset.fan.pauc must be a percentage in \[0, 100\], got 101.5",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["results"]["development_dataset"].update(
                fan={"auc_source": 0.7, "auc_target": 0.6, "pauc": 0.5}
            ),
            "they look like fractions",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["submission"]["authors"][0].update(email="kit@example.org"),
            "placeholder address",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["submission"]["authors"][0].update(email="ann at uni"),
            "is not an e-mail address",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["submission"]["authors"][0].update(affiliation={"department": "x"}),
            "affiliation needs an institution",
        ),
        (
            LABEL,
            None,
            None,
            lambda m: m["system"]["description"].update(ensemble_method_subsystem_count=0),
            "ensemble_method_subsystem_count must be a whole number >= 1",
        ),
    ],
)
def test_write_system_rejects_bad_input(tmp_path, label, scores, thresholds, meta, message):
    data = make_scores() if scores is None else scores(make_scores())
    info = filled_meta()
    if meta is not None:
        meta(info)
    with pytest.raises(ValueError, match=message):
        write_system(tmp_path, label, data, THRESHOLDS if thresholds is None else thresholds, info)
    assert list(tmp_path.iterdir()) == []


def test_an_error_leaves_the_old_system_intact(system):
    before = {p.name: p.read_bytes() for p in system.iterdir()}
    bad = make_scores(seed=5)
    bad.loc[bad["machine"] == "ToyDrone", "score"] = np.nan
    with pytest.raises(ValueError, match="ToyDrone"):
        write_system(system.parent, LABEL, bad, THRESHOLDS, filled_meta())
    assert {p.name: p.read_bytes() for p in system.iterdir()} == before
    assert leftovers(system.parent) == []


def test_a_failure_midway_leaves_the_old_system_intact(system, monkeypatch):
    before = {p.name: p.read_bytes() for p in system.iterdir()}

    def disk_full(path, meta):
        raise OSError("disk full")

    # The CSVs of the new system are written before the meta file fails.
    monkeypatch.setattr(submission, "_write_meta", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_system(system.parent, LABEL, make_scores(seed=9), THRESHOLDS, filled_meta())
    assert {p.name: p.read_bytes() for p in system.iterdir()} == before
    assert leftovers(system.parent) == []


def test_a_new_system_replaces_the_old_one(system):
    fewer = make_scores(seed=3).query("machine == 'Sander'")
    write_system(system.parent, LABEL, fewer, THRESHOLDS, filled_meta())
    assert sorted(p.name for p in system.iterdir()) == [
        f"{LABEL}.meta.yaml",
        "anomaly_score_Sander_section_00_test.csv",
        "decision_result_Sander_section_00_test.csv",
    ]


def test_invalid_submission_is_not_zipped_and_the_old_zip_survives(system, tmp_path):
    zip_path = make_zip(system.parent, tmp_path / "sub.zip")
    before = zip_path.read_bytes()
    (system / "decision_result_Sander_section_00_test.csv").unlink()
    with pytest.raises(ValueError, match="missing file decision_result_Sander_section_00_test.csv"):
        make_zip(system.parent, zip_path)
    assert zip_path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_zip_needs_an_existing_pdf_report(system, tmp_path):
    with pytest.raises(FileNotFoundError, match="technical report .*missing.pdf not found"):
        make_zip(system.parent, tmp_path / "sub.zip", tmp_path / "missing.pdf")
    (tmp_path / "report.docx").write_bytes(b"doc")
    with pytest.raises(ValueError, match="is not a .pdf file"):
        make_zip(system.parent, tmp_path / "sub.zip", tmp_path / "report.docx")
    assert not (tmp_path / "sub.zip").exists()


# --------------------------------------------------------------------------------------------------
# The validator: one precise message per rule
# --------------------------------------------------------------------------------------------------


def rewrite(path: Path, change) -> None:
    path.write_text(change(path.read_text()))


SCORE_CSV = "anomaly_score_Sander_section_00_test.csv"
DECISION_CSV = "decision_result_Sander_section_00_test.csv"


def drop_line(text: str, name: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith(name))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: (s / DECISION_CSV).unlink(), f"{LABEL}: missing file {DECISION_CSV}"),
        (lambda s: (s / SCORE_CSV).unlink(), f"{LABEL}: missing file {SCORE_CSV}"),
        (
            lambda s: rewrite(s / SCORE_CSV, lambda t: t + t.splitlines()[1] + "\n"),
            f"{SCORE_CSV}: file section_00_0001.wav is listed 2 times (lines 2, 6)",
        ),
        (
            lambda s: rewrite(s / SCORE_CSV, lambda t: "file_name,score\n" + t),
            f"{SCORE_CSV} line 1: 'file_name,score' looks like a header row; these CSVs have no header",
        ),
        (
            lambda s: rewrite(s / SCORE_CSV, lambda t: t.replace(t.splitlines()[2].split(",")[1], "nan")),
            f"{SCORE_CSV} line 3: score nan for section_00_0002.wav is not finite",
        ),
        (
            lambda s: rewrite(
                s / SCORE_CSV, lambda t: t.replace("section_00_0003.wav,", "section_00_0003.wav,x,")
            ),
            f"{SCORE_CSV} line 4: expected 2 columns (file_name,value), found 3",
        ),
        (
            lambda s: rewrite(
                s / DECISION_CSV, lambda t: re.sub("section_00_0004.wav,[01]", "section_00_0004.wav,2", t)
            ),
            f"{DECISION_CSV} line 5: value 2 for section_00_0004.wav is not 0 or 1",
        ),
        (
            lambda s: rewrite(s / DECISION_CSV, lambda t: drop_line(t, "section_00_0004.wav")),
            f"{SCORE_CSV} and {DECISION_CSV} list different files; only in scores: section_00_0004.wav; "
            "only in decisions: none",
        ),
        (lambda s: (s / SCORE_CSV).write_text(""), f"{SCORE_CSV}: the file is empty"),
        (lambda s: (s / SCORE_CSV).write_bytes(b"\xff\xfe"), f"{SCORE_CSV}: not a UTF-8 text CSV"),
        (lambda s: (s / "notes.txt").write_text("hi"), "notes.txt: unexpected file"),
        (lambda s: (s / f"{LABEL}.meta.yaml").unlink(), f"{LABEL}: missing file {LABEL}.meta.yaml"),
        (
            lambda s: (s / f"{LABEL}.meta.yaml").rename(s / "Other_UNI_task2_1.meta.yaml"),
            f"Other_UNI_task2_1.meta.yaml: the meta file must be named {LABEL}.meta.yaml",
        ),
        (lambda s: (s / f"{LABEL}.meta.yaml").write_text("submission: [unclosed"), "not valid YAML"),
        (
            lambda s: rewrite(s / f"{LABEL}.meta.yaml", lambda t: t.replace("    front_end: null\n", "")),
            "missing field system.description.front_end",
        ),
        (
            lambda s: rewrite(
                s / f"{LABEL}.meta.yaml", lambda t: t.replace("corresponding: true", "corresponding: false")
            ),
            "no author is marked corresponding: true",
        ),
        (
            lambda s: rewrite(
                s / f"{LABEL}.meta.yaml",
                lambda t: t.replace("total_parameters: null", "total_parameters: many"),
            ),
            "total_parameters must be a whole number, got 'many'",
        ),
        (lambda s: s.rename(s.parent / "Smith_task2_1"), "folder name 'Smith_task2_1' does not match"),
    ],
)
def test_each_validator_rule_has_its_message(system, damage, message):
    damage(system)
    problems = validate(system.parent)
    assert any(message in problem for problem in problems), problems
    with pytest.raises(ValueError, match="problem"):
        assert_valid(system.parent)


def test_validator_checks_the_test_clips(system):
    rewrite(system / SCORE_CSV, lambda t: drop_line(t, "section_00_0004.wav"))
    rewrite(system / DECISION_CSV, lambda t: drop_line(t, "section_00_0004.wav"))
    assert validate(system) == []  # without the test list, a consistent pair is fine
    problems = validate(system, EXPECTED)
    assert f"{system}/{SCORE_CSV}: 1 test clip(s) of Sander missing: section_00_0004.wav" in problems
    assert f"{system}/{DECISION_CSV}: 1 test clip(s) of Sander missing: section_00_0004.wav" in problems

    extra = {"Sander": CLIPS[:4], "ToyDrone": CLIPS, "Sander2": CLIPS}
    rewrite(system / SCORE_CSV, lambda t: t + "section_00_0004.wav,0.5\n")
    rewrite(system / DECISION_CSV, lambda t: t + "section_00_0004.wav,1\n")
    problems = validate(system, extra)
    assert f"{system}/{SCORE_CSV}: 1 file(s) not in the test set of Sander: section_00_0004.wav" in problems
    assert any("missing files for machine Sander2" in problem for problem in problems)
    problems = validate(system, {"Sander": CLIPS})
    assert any("machine ToyDrone is not in the test set" in problem for problem in problems)


def test_validator_flags_a_clip_of_another_section(system):
    rewrite(system / SCORE_CSV, lambda t: t.replace("section_00_0004.wav", "section_01_0004.wav"))
    rewrite(system / DECISION_CSV, lambda t: t.replace("section_00_0004.wav", "section_01_0004.wav"))
    assert any("1 file(s) of another section: section_01_0004.wav" in p for p in validate(system))


def test_validator_on_a_zip(system, tmp_path):
    zip_path = tmp_path / "broken.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in system.iterdir():
            if path.name not in (DECISION_CSV, "anomaly_score_ToyDrone_section_00_test.csv"):
                archive.write(path, f"{LABEL}/{path.name}")
        archive.writestr(f"{LABEL}/anomaly_score_ToyDrone_section_00_test.csv", "file_name,score\n")
    problems = validate(zip_path)
    assert f"{zip_path}/{LABEL}: missing file {DECISION_CSV}" in problems
    assert any(
        "anomaly_score_ToyDrone_section_00_test.csv line 1: 'file_name,score' looks like a header" in p
        for p in problems
    )
    not_a_zip = tmp_path / "fake.zip"
    not_a_zip.write_text("hello")
    assert validate(not_a_zip) == [f"{not_a_zip}: neither a folder nor a zip file"]
    with pytest.raises(FileNotFoundError, match="not found"):
        validate(tmp_path / "nothing.zip")


def test_validator_counts_systems(system, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate(empty) == [f"{empty}: no system folder (with <label>.meta.yaml and the CSVs) found"]
    for index in range(2, 6):
        label = f"Smith_UNI_task2_{index}" if index < 5 else "Smith_UNI_task2_1b"
        (system.parent / label).mkdir()
        for path in system.iterdir():
            target = path.name.replace(LABEL, label)
            text = path.read_text().replace(f"label: {LABEL}", f"label: {label}")
            (system.parent / label / target).write_text(text)
    problems = validate(system.parent)
    assert f"{system.parent}: 5 systems; at most 4 per team" in problems
    assert any("folder name 'Smith_UNI_task2_1b' does not match" in p for p in problems)


def test_expected_test_files_from_the_raw_layout(tmp_path):
    for machine in MACHINES:
        (tmp_path / machine / "test").mkdir(parents=True)
        for name in CLIPS:
            (tmp_path / machine / "test" / name).write_bytes(b"")
    (tmp_path / "README.txt").write_text("not a machine")
    assert expected_test_files(tmp_path) == EXPECTED
    with pytest.raises(FileNotFoundError, match="not found"):
        expected_test_files(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_command_lists_problems_with_exit_code_1(system):
    (system / DECISION_CSV).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "kit.submission", "validate", str(system.parent)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert f"- {system}: missing file {DECISION_CSV}" in result.stderr


def test_command_valid_zip_and_bad_path(system, tmp_path, capsys):
    raw = tmp_path / "raw"
    for machine in MACHINES:
        (raw / machine / "test").mkdir(parents=True)
        for name in CLIPS:
            (raw / machine / "test" / name).write_bytes(b"")
    assert submission.main(["validate", str(system.parent), "--test-dir", str(raw)]) == 0
    assert "valid" in capsys.readouterr().out
    zip_path = tmp_path / "out" / "sub.zip"
    assert submission.main(["zip", str(system.parent), str(zip_path)]) == 0
    assert zip_path.is_file()
    assert submission.main(["validate", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Authors, per-system meta and the development files
# --------------------------------------------------------------------------------------------------


def test_authors_come_from_the_users_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(submission.AUTHORS_VARIABLE, raising=False)
    assert submission.load_authors() is None
    single = dict(AUTHOR)
    single.pop("corresponding")
    path = tmp_path / "authors.yaml"
    path.write_text(yaml.safe_dump({"authors": [single]}))
    assert submission.load_authors(path) == [AUTHOR]  # a single author is the corresponding one
    monkeypatch.setenv(submission.AUTHORS_VARIABLE, str(path))
    assert submission.load_authors() == [AUTHOR]
    with pytest.raises(FileNotFoundError, match="authors file .*nope.yaml not found"):
        submission.load_authors(tmp_path / "nope.yaml")
    path.write_text(yaml.safe_dump([dict(AUTHOR, email="me@example.com")]))
    with pytest.raises(ValueError, match=r"authors\.yaml is incomplete:\n.*placeholder address"):
        submission.load_authors(path)
    path.write_text("authors: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        submission.load_authors(path)
    example = yaml.safe_load((REPO / "authors.example.yaml").read_text())
    assert submission.author_problems(example["authors"], "example") == [
        "example: submission.authors[0].email 'jane.doe@example.org' is a placeholder address (a reserved "
        "example domain)"
    ]  # the committed example must be edited before it can be used


def test_system_meta_fills_the_computed_fields(tmp_path):
    described = {
        "submission": {"name": "BEATs ArcFace 1-NN", "abbreviation": "BEATs1NN"},
        "system": {"description": {"embeddings": "BEATs"}},
    }
    meta = submission.system_meta(described, authors=[AUTHOR], subsystems=3, parameters=271_000_000)
    assert meta["system"]["description"]["ensemble_method_subsystem_count"] == 3
    assert meta["system"]["complexity"]["total_parameters"] == 271_000_000
    assert meta["system"]["description"]["embeddings"] == "BEATs"
    assert meta["submission"]["authors"] == [AUTHOR]
    with pytest.raises(ValueError, match="unknown meta field 'system.description.embedings'"):
        submission.system_meta(
            {"system": {"description": {"embedings": "x"}}}, authors=[AUTHOR], subsystems=1, parameters=1
        )


def _dev_scores(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for machine in ("fan", "valve"):
        for i in range(20):
            rows.append(
                (
                    "dev",
                    machine,
                    "00",
                    "train",
                    f"section_00_source_train_normal_{i:04d}_a_1.wav",
                    "source",
                    "normal",
                )
            )
        for i, (domain, label) in enumerate(
            [(d, lab) for d in ("source", "target") for lab in ("normal", "anomaly")] * 3
        ):
            rows.append(
                (
                    "dev",
                    machine,
                    "00",
                    "test",
                    f"section_00_{domain}_test_{label}_{i:04d}_a_1.wav",
                    domain,
                    label,
                )
            )
    frame = pd.DataFrame(
        rows, columns=["dataset", "machine", "section", "split", "file_name", "domain", "label"]
    )
    return frame.assign(channel="near", score=rng.gamma(2.0, size=len(frame)) + (frame["label"] == "anomaly"))


def test_development_files_are_official_csvs_of_the_dev_test_clips(tmp_path):
    systems = {"a-knn-near": _dev_scores(0), "fusion": _dev_scores(1)}
    written = submission.write_development_files(tmp_path / "dev", systems)
    assert sorted(written) == ["a-knn-near", "fusion"]
    for name, folder in written.items():
        files = sorted(p.name for p in folder.iterdir())
        assert files == [
            "anomaly_score_fan_section_00_test.csv",
            "anomaly_score_valve_section_00_test.csv",
            "decision_result_fan_section_00_test.csv",
            "decision_result_valve_section_00_test.csv",
        ]
        scores = systems[name]
        test = scores[(scores["split"] == "test") & (scores["machine"] == "fan")].sort_values("file_name")
        back = pd.read_csv(
            folder / "anomaly_score_fan_section_00_test.csv", header=None, names=["file_name", "score"]
        )
        assert back["file_name"].tolist() == test["file_name"].tolist()
        np.testing.assert_array_equal(back["score"].to_numpy(), test["score"].to_numpy())
        train = scores[(scores["split"] == "train") & (scores["machine"] == "fan")]["score"]
        decisions = pd.read_csv(folder / "decision_result_fan_section_00_test.csv", header=None)[1]
        assert decisions.tolist() == (back["score"] > gamma_threshold(train)).astype(int).tolist()
    with pytest.raises(ValueError, match="no development test scores"):
        submission.write_development_files(tmp_path / "x", {"e": _dev_scores(0).assign(dataset="eval")})
