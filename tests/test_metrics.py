"""Tests for kit.metrics: hand-computed cases, the organisers' evaluator output, the command, errors."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from kit import metrics
from kit.metrics import (
    EPSILON,
    attach_ground_truth,
    load_ground_truth,
    load_score_dir,
    official_score,
    results_table,
    section_metrics,
    to_markdown,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-12
OFFICIAL_SCORE = 0.6378470939584875


def section_frame(clips, machine="fan", section="00"):
    """clips: (score, label, domain[, decision]) tuples -> a score table with file names."""
    columns = ["score", "label", "domain", "decision"][: len(clips[0])]
    frame = pd.DataFrame(clips, columns=columns)
    frame.insert(0, "file_name", [f"section_{section}_{i:04d}.wav" for i in range(len(frame))])
    frame.insert(0, "section", section)
    frame.insert(0, "machine", machine)
    return frame


# Source normals 0.1, 0.2; target normals 0.8, 0.9; one source anomaly 0.5; target anomalies 0.15, 0.95.
MASK_CASE = [
    (0.1, "normal", "source"),
    (0.2, "normal", "source"),
    (0.8, "normal", "target"),
    (0.9, "normal", "target"),
    (0.5, "anomaly", "source"),
    (0.15, "anomaly", "target"),
    (0.95, "anomaly", "target"),
]


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_domain_auc_uses_the_domain_normals_plus_all_anomalies():
    row = section_metrics(section_frame(MASK_CASE)).iloc[0]
    # AUC(source): normals {0.1, 0.2} vs anomalies {0.5, 0.15, 0.95}: 5 of 6 pairs ranked right.
    assert row["auc_source"] == pytest.approx(5 / 6, abs=TOLERANCE)
    # AUC(target): normals {0.8, 0.9} vs the same anomalies: only 0.95 beats both -> 2 of 6.
    assert row["auc_target"] == pytest.approx(2 / 6, abs=TOLERANCE)
    # All clips together: 7 of 12 pairs; the source domain alone (no target anomalies) would give 1.0.
    assert row["auc_all"] == pytest.approx(7 / 12, abs=TOLERANCE)
    assert row["auc_source"] != pytest.approx(1.0)
    assert row["auc_source"] != pytest.approx(row["auc_all"])


def test_pauc_is_mcclish_standardised():
    # Ten normals 0..9 and anomalies 9.5 and 8.5: up to FPR 0.1 the ROC sits at TPR 0.5,
    # so the raw partial area is 0.05; McClish: 0.5 * (1 + (0.05 - 0.005) / (0.1 - 0.005)) = 14/19.
    clips = [(float(s), "normal", "source" if s < 5 else "target") for s in range(10)]
    clips += [(9.5, "anomaly", "source"), (8.5, "anomaly", "target")]
    row = section_metrics(section_frame(clips)).iloc[0]
    assert row["pauc"] == pytest.approx(14 / 19, abs=TOLERANCE)
    assert row["pauc"] != pytest.approx(0.05 / 0.1)


def test_official_score_is_the_flat_harmonic_mean_not_a_mean_of_machine_means():
    fan = [0.9, 0.9, 0.9]
    valve = [0.5, 0.9, 0.6]
    flat = fan + valve
    expected = len(flat) / sum(1 / v for v in flat)
    mean_of_machine_hmeans = (scipy.stats.hmean(fan) + scipy.stats.hmean(valve)) / 2
    assert official_score(flat) == pytest.approx(expected, abs=TOLERANCE)
    assert abs(official_score(flat) - mean_of_machine_hmeans) > 1e-3


def test_results_table_overall_row_holds_the_flat_harmonic_mean():
    easy = section_frame(MASK_CASE, machine="fan")
    # valve: the anomalies score 0.05 higher, so its AUC(source) differs from fan's.
    hard = section_frame(
        [(s + 0.05 if lab == "anomaly" else s, lab, dom) for s, lab, dom in MASK_CASE], "valve"
    )
    table = results_table({"sys": pd.concat([easy, hard])})
    sections = table[table["level"] == "section"]
    flat = np.concatenate([sections[c].to_numpy() for c in ("auc_source", "auc_target", "pauc")])
    overall = table[table["level"] == "overall"].iloc[0]
    assert overall["hmean"] == pytest.approx(len(flat) / np.sum(1 / flat), abs=TOLERANCE)
    assert overall["hmean"] != pytest.approx(table.loc[table["level"] == "machine", "hmean"].mean())
    assert overall["auc_source"] == pytest.approx(scipy.stats.hmean(sections["auc_source"]), abs=TOLERANCE)
    assert overall["amean"] == pytest.approx(flat.mean(), abs=TOLERANCE)
    assert list(table["level"]) == ["section", "section", "machine", "machine", "overall"]
    assert list(table["machine"]) == ["fan", "valve", "fan", "valve", "overall"]


def test_zero_auc_is_floored_at_machine_epsilon():
    assert official_score([0.0, 0.8, 0.9]) == pytest.approx(3 / (1 / EPSILON + 1 / 0.8 + 1 / 0.9), rel=1e-12)
    assert 0 < official_score([0.0, 0.8, 0.9]) < 1e-14
    # A system that ranks every anomaly below every normal: AUCs and pAUC of 0, hmean floored, no error.
    clips = [(1.0, 0, 0), (2.0, 0, 1), (0.1, 1, 0), (0.2, 1, 1)]
    row = section_metrics(section_frame(clips)).iloc[0]
    assert row["auc_source"] == 0.0 and row["auc_target"] == 0.0
    assert row["hmean"] == pytest.approx(EPSILON, rel=1e-9)


def test_precision_recall_f1_per_domain():
    clips = [
        (0.1, 0, 0, 1),
        (0.2, 0, 0, 0),
        (0.9, 1, 0, 1),
        (0.8, 1, 0, 0),
        (0.3, 0, 1, 0),
        (0.4, 0, 1, 0),
        (0.7, 1, 1, 0),
    ]
    row = section_metrics(section_frame(clips)).iloc[0]
    # Source: one true positive of two decisions and of two anomalies.
    assert (row["precision_source"], row["recall_source"], row["f1_source"]) == pytest.approx((0.5, 0.5, 0.5))
    # Target: no positive decision at all -> precision, recall and F1 are 0 (denominators floored).
    assert (row["precision_target"], row["recall_target"], row["f1_target"]) == (0.0, 0.0, 0.0)


def test_label_and_domain_spellings_give_the_same_numbers():
    words = section_frame(MASK_CASE)
    numbers = words.assign(
        label=(words["label"] == "anomaly").astype(int), domain=(words["domain"] == "target").astype(int)
    )
    booleans = numbers.assign(label=numbers["label"].astype(bool), domain=numbers["domain"].astype(bool))
    shouting = words.assign(label=words["label"].str.upper(), section=0)
    expected = section_metrics(words)
    for variant in (numbers, booleans, shouting):
        pd.testing.assert_frame_equal(section_metrics(variant), expected)


def test_row_order_does_not_matter():
    frame = section_frame(MASK_CASE)
    shuffled = frame.sample(frac=1.0, random_state=3)
    pd.testing.assert_frame_equal(section_metrics(shuffled), section_metrics(frame))


# --------------------------------------------------------------------------------------------------
# The organisers' evaluator on real ground truth
# --------------------------------------------------------------------------------------------------


def parse_evaluator_result(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """systemA_result.csv -> ({machine: {column: value}}, {summary row name: values})."""
    per_machine, summary = {}, {}
    machine = header = None
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if not row:
                continue
            if len(row) == 1:
                machine = row[0]
            elif row[0] == "section":
                header = row
            elif row[0] == "00":
                per_machine[machine] = {name: float(value) for name, value in zip(header[1:], row[1:])}
            elif "over all" in row[0] or row[0] == "official score":
                summary[row[0]] = [float(value) for value in row[2:]]
    return per_machine, summary


EVALUATOR_COLUMNS = {
    "AUC (all)": "auc_all",
    "AUC (source)": "auc_source",
    "AUC (target)": "auc_target",
    "pAUC": "pauc",
    "precision (source)": "precision_source",
    "precision (target)": "precision_target",
    "recall (source)": "recall_source",
    "recall (target)": "recall_target",
    "F1 score (source)": "f1_source",
    "F1 score (target)": "f1_target",
}


def shuffled_copy(source: Path, target: Path, seed: int) -> Path:
    """Copy a folder of headerless CSVs with every file's rows in a new random order."""
    rng = np.random.default_rng(seed)
    for path in source.rglob("*.csv"):
        lines = [line for line in path.read_text().splitlines() if line]
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines[i] for i in rng.permutation(len(lines))) + "\n")
    return target


@pytest.fixture(scope="module")
def evaluator_expected(metric_fixtures):
    return parse_evaluator_result(metric_fixtures / "expected" / "systemA_result.csv")


@pytest.mark.parametrize("reshuffle", [False, True], ids=["as-given", "reshuffled"])
def test_reproduces_the_organisers_evaluator(metric_fixtures, evaluator_expected, tmp_path, reshuffle):
    gt_dir, scores_dir = metric_fixtures, metric_fixtures / "scores"
    if reshuffle:
        gt_dir = tmp_path / "gt"
        for folder in ("ground_truth_data", "ground_truth_domain", "ground_truth_attributes"):
            shuffled_copy(metric_fixtures / folder, gt_dir / folder, seed=1)
        scores_dir = shuffled_copy(scores_dir, tmp_path / "scores", seed=2)
    scores = attach_ground_truth(load_score_dir(scores_dir), load_ground_truth(gt_dir))
    if reshuffle:
        scores = scores.sample(frac=1.0, random_state=4)
    table = results_table({"systemA": scores})
    per_machine, summary = evaluator_expected

    sections = table[table["level"] == "section"].set_index("machine")
    assert sorted(sections.index) == sorted(per_machine)
    for machine, expected in per_machine.items():
        for their_name, our_name in EVALUATOR_COLUMNS.items():
            assert sections.at[machine, our_name] == pytest.approx(expected[their_name], abs=TOLERANCE), (
                machine,
                their_name,
            )
        # The evaluator's per-machine "harmonic mean" of AUC is over AUC(source) and AUC(target).
        assert sections.at[machine, "hmean_auc"] == pytest.approx(
            scipy.stats.hmean([expected["AUC (source)"], expected["AUC (target)"]]), abs=TOLERANCE
        )

    overall = table[table["level"] == "overall"].iloc[0]
    all_hmean = summary["harmonic mean over all machine types, sections, and domains"]
    source_hmean = summary["source harmonic mean over all machine types, sections, and domains"]
    target_hmean = summary["target harmonic mean over all machine types, sections, and domains"]
    arithmetic = summary["arithmetic mean over all machine types, sections, and domains"]
    checks = {
        "hmean_auc": all_hmean[0],
        "pauc": all_hmean[1],
        "amean_auc": arithmetic[0],
        "auc_source": source_hmean[0],
        "precision_source": source_hmean[2],
        "recall_source": source_hmean[3],
        "f1_source": source_hmean[4],
        "auc_target": target_hmean[0],
        "precision_target": target_hmean[2],
        "recall_target": target_hmean[3],
        "f1_target": target_hmean[4],
        "hmean": summary["official score"][0],
    }
    for column, value in checks.items():
        assert overall[column] == pytest.approx(value, abs=TOLERANCE), column
    assert overall["hmean"] == pytest.approx(OFFICIAL_SCORE, abs=TOLERANCE)


def test_matches_the_evaluator_summary_row(metric_fixtures):
    summary = pd.read_csv(metric_fixtures / "expected" / "official_score.csv", index_col=0).loc["systemA"]
    scores = attach_ground_truth(
        load_score_dir(metric_fixtures / "scores"), load_ground_truth(metric_fixtures)
    )
    table = results_table({"systemA": scores})
    overall = table[table["level"] == "overall"].iloc[0]
    assert overall["hmean"] == pytest.approx(summary["official score"], abs=TOLERANCE)
    assert overall["amean_auc"] == pytest.approx(summary["arithmetic mean"], abs=TOLERANCE)
    assert overall["auc_source"] == pytest.approx(summary["harmonic mean (source)"], abs=TOLERANCE)
    assert overall["auc_target"] == pytest.approx(summary["harmonic mean (target)"], abs=TOLERANCE)
    machines = table[table["level"] == "machine"].set_index("machine")
    for machine in machines.index:
        for domain in ("source", "target"):
            expected = summary[f"{machine} AUC ({domain})"]
            assert machines.at[machine, f"auc_{domain}"] == pytest.approx(expected, abs=TOLERANCE)


def test_scores_under_development_style_names_are_matched(metric_fixtures, tmp_path):
    # The evaluator maps names from ground_truth_attributes; a system that wrote those gets the same result.
    truth = load_ground_truth(metric_fixtures)
    scores = load_score_dir(metric_fixtures / "scores")
    long_names = truth.set_index(["machine", "section", "file_name"])["original_name"]
    renamed = scores.assign(
        file_name=long_names.reindex(
            pd.MultiIndex.from_frame(scores[["machine", "section", "file_name"]])
        ).values
    )
    assert not renamed["file_name"].equals(scores["file_name"])
    table = results_table({"s": attach_ground_truth(renamed, truth)})
    assert table.iloc[-1]["hmean"] == pytest.approx(OFFICIAL_SCORE, abs=TOLERANCE)


# --------------------------------------------------------------------------------------------------
# Output: results.csv and Markdown
# --------------------------------------------------------------------------------------------------


def test_write_results_round_trips_and_leaves_no_temporary(tmp_path):
    table = results_table({"sys": section_frame(MASK_CASE)})
    path = write_results(table, tmp_path / "run")
    assert path == tmp_path / "run" / "results.csv"
    back = pd.read_csv(path, dtype={"section": str})
    pd.testing.assert_frame_equal(back, table, check_exact=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.csv"]


def test_to_markdown_renders_a_table():
    table = pd.DataFrame({"machine": ["fan", "overall"], "hmean": [0.123456, np.nan], "n_clips": [7, 14]})
    text = to_markdown(table, digits=3)
    assert text.splitlines() == [
        "| machine | hmean | n_clips |",
        "|---|---:|---:|",
        "| fan | 0.123 | 7 |",
        "| overall |  | 14 |",
    ]
    with pytest.raises(ValueError, match="unknown column"):
        to_markdown(table, ["nope"])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: f.assign(score=f["score"].where(f.index != 2, np.nan)),
            r"not a finite.*fan section 00 file section_00_0002",
        ),
        (lambda f: f.assign(score=f["score"].where(f.index != 3, np.inf)), r"inf.*file section_00_0003"),
        (lambda f: f.assign(label="normal"), r"fan section 00: all 7 clips are normal"),
        (lambda f: f.assign(domain="target"), r"fan section 00: no source-domain normal clips"),
        (
            lambda f: f.assign(label=f["label"].replace("anomaly", "broken")),
            r"label must be .*'broken'.*file section_00_0004",
        ),
        (lambda f: f.assign(domain=f["domain"].replace("target", 7)), r"domain must be .* got 7"),
        (
            lambda f: pd.concat([f, f.iloc[[1]]]),
            r"more than once: machine fan section 00 file section_00_0001",
        ),
        (lambda f: f.drop(columns="domain"), r"lack column\(s\) \['domain'\]"),
        (lambda f: f.assign(section="sec-A"), r"section 'sec-A' is not a section id"),
        (lambda f: f.iloc[:0], r"scores are empty"),
    ],
)
def test_bad_scores_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        section_metrics(change(section_frame(MASK_CASE)))


def test_official_score_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="finite"):
        official_score([0.5, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        official_score([])


@pytest.fixture()
def tiny_ground_truth(tmp_path):
    """Ground truth for one machine in the organisers' layout, and its matching scores table."""
    frame = section_frame(MASK_CASE)
    for folder, column, one in (
        ("ground_truth_data", "label", "anomaly"),
        ("ground_truth_domain", "domain", "target"),
    ):
        (tmp_path / "gt" / folder).mkdir(parents=True)
        lines = [f"{name},{int(value == one)}" for name, value in zip(frame["file_name"], frame[column])]
        (tmp_path / "gt" / folder / "ground_truth_fan_section_00_test.csv").write_text(
            "\n".join(lines) + "\n"
        )
    return tmp_path / "gt", frame[["machine", "section", "file_name", "score"]]


def test_scored_file_not_in_ground_truth_is_named(tiny_ground_truth):
    gt_dir, scores = tiny_ground_truth
    extra = pd.concat([scores, scores.iloc[[0]].assign(file_name="section_00_9999.wav")])
    with pytest.raises(
        ValueError, match=r"fan section 00: 1 file\(s\) not in the ground truth: section_00_9999.wav"
    ):
        attach_ground_truth(extra, load_ground_truth(gt_dir))


def test_ground_truth_file_missing_from_scores_is_named(tiny_ground_truth):
    gt_dir, scores = tiny_ground_truth
    with pytest.raises(
        ValueError, match=r"fan section 00: 1 file\(s\) missing from the scores: section_00_0006.wav"
    ):
        attach_ground_truth(scores.iloc[:-1], load_ground_truth(gt_dir))


def test_machine_absent_on_one_side_is_named(tiny_ground_truth):
    gt_dir, scores = tiny_ground_truth
    truth = load_ground_truth(gt_dir)
    with pytest.raises(ValueError, match="scores for valve section 00, which the ground truth does not hold"):
        attach_ground_truth(pd.concat([scores, scores.assign(machine="valve")]), truth)
    with pytest.raises(ValueError, match="no scores for fan section 00"):
        attach_ground_truth(scores.assign(machine="valve"), pd.concat([truth, truth.assign(machine="valve")]))


def test_bad_ground_truth_layout(tiny_ground_truth, tmp_path):
    gt_dir, _ = tiny_ground_truth
    with pytest.raises(FileNotFoundError, match="nowhere/ground_truth_data not found"):
        load_ground_truth(tmp_path / "nowhere")
    (gt_dir / "ground_truth_domain" / "ground_truth_fan_section_00_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="ground_truth_fan_section_00_test.csv not found"):
        load_ground_truth(gt_dir)


def test_bad_score_files_raise_clear_errors(tmp_path):
    folder = tmp_path / "scores"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="no anomaly_score_"):
        load_score_dir(folder)
    score_file = folder / "anomaly_score_fan_section_00_test.csv"
    score_file.write_text("file_name,score\nsection_00_0000.wav,0.5\n")
    with pytest.raises(ValueError, match="line 1: 'file_name,score' looks like a header row"):
        load_score_dir(folder)
    score_file.write_text("section_00_0000.wav,0.5\nsection_00_0001.wav,nan\n")
    with pytest.raises(ValueError, match="line 2: score nan for section_00_0001.wav is not finite"):
        load_score_dir(folder)
    score_file.write_text("section_00_0000.wav,0.5\nsection_00_0001.wav,0.1,0.2\n")
    with pytest.raises(ValueError, match="line 2: expected 2 columns"):
        load_score_dir(folder)
    score_file.write_text("section_00_0000.wav,0.5\nsection_00_0000.wav,0.7\n")
    with pytest.raises(ValueError, match=r"section_00_0000.wav is listed 2 times \(lines 1, 2\)"):
        load_score_dir(folder)
    score_file.write_text("section_00_0000.wav,0.5\n")
    (folder / "decision_result_fan_section_00_test.csv").write_text("section_00_0000.wav,2\n")
    with pytest.raises(ValueError, match="value 2 for section_00_0000.wav is not 0 or 1"):
        load_score_dir(folder)
    (folder / "anomaly_score_valve_section_00_test.csv").write_text("section_00_0000.wav,0.5\n")
    with pytest.raises(ValueError, match="missing: decision_result_valve_section_00_test.csv"):
        load_score_dir(folder)


# --------------------------------------------------------------------------------------------------
# Development scores: labels and domains from the file names
# --------------------------------------------------------------------------------------------------


def development_name(
    number: int, label: int, domain: int, attributes: str = "noAttribute", section="00"
) -> str:
    return (
        f"section_{section}_{('source', 'target')[domain]}_test_{('normal', 'anomaly')[label]}_"
        f"{number:04d}_{attributes}.wav"
    )


def test_labels_from_development_file_names():
    names = [
        development_name(1, 0, 0, "spd_1"),
        development_name(2, 1, 0, "car_C2_spd_5_mic_2_mic_1"),
        development_name(3, 0, 1),
        development_name(4, 1, 1),
    ]
    scores = pd.DataFrame(
        {"machine": "fan", "section": "section_00", "file_name": names, "score": [0.1, 0.9, 0.2, 0.8]}
    )
    labelled = metrics.labels_from_file_names(scores.assign(label=9))  # a stale label column is replaced
    assert labelled["label"].tolist() == [0, 1, 0, 1]
    assert labelled["domain"].tolist() == [0, 0, 1, 1]
    assert labelled["section"].tolist() == ["00"] * 4
    assert labelled["score"].tolist() == [0.1, 0.9, 0.2, 0.8]


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "section_00_0003.wav",
            r"1 scored file name\(s\) carry no label and domain .*section_00_0003.wav.*--ground-truth",
        ),
        ("clip_3.wav", r"carry no label and domain \(machine fan section 00: clip_3.wav\)"),
        ("section_00_source_train_normal_0003_spd_1.wav", "is a training clip"),
        ("section_01_source_test_normal_0003_spd_1.wav", "names another section than its score file"),
    ],
)
def test_file_names_without_usable_labels_are_named(name, message):
    scores = pd.DataFrame(
        {
            "machine": "fan",
            "section": "00",
            "file_name": [development_name(1, 1, 0), name],
            "score": [1.0, 0.0],
        }
    )
    with pytest.raises(ValueError, match=message):
        metrics.labels_from_file_names(scores)


def write_development_scores(metric_fixtures, folder: Path) -> None:
    """The fixture system's score and decision files, each clip renamed to the development-style
    name its ground truth gives (domain and label in the name, as development test clips are)."""
    truth = load_ground_truth(metric_fixtures).set_index(["machine", "file_name"])
    folder.mkdir(parents=True)
    for path in sorted((metric_fixtures / "scores").glob("*.csv")):
        machine = (metrics.SCORE_FILE.match(path.name) or metrics.DECISION_FILE.match(path.name))["machine"]
        rows = list(csv.reader(path.read_text().splitlines()))
        with open(folder / path.name, "w", newline="") as handle:
            for name, value in rows:
                label, domain = truth.loc[(machine, name), ["label", "domain"]]
                number = int(name.removesuffix(".wav").rsplit("_", 1)[1])
                csv.writer(handle, lineterminator="\n").writerow(
                    [development_name(number, label, domain), value]
                )


def test_command_scores_development_names_without_ground_truth(metric_fixtures, tmp_path, capsys):
    """Known answer: the organisers' evaluator result of the same scores under evaluation names."""
    write_development_scores(metric_fixtures, tmp_path / "dev" / "systemA")
    out = tmp_path / "results.csv"
    assert metrics.main([str(tmp_path / "dev"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "labels and domains: the development file names" in printed
    line = next(x for x in printed.splitlines() if x.startswith("official score (systemA): "))
    assert float(line.split(": ")[1]) == pytest.approx(OFFICIAL_SCORE, abs=TOLERANCE)
    table = pd.read_csv(out)
    assert {"f1_source", "f1_target"} <= set(table.columns)  # the decision files were read too
    machines = table[table["level"] == "machine"].set_index("machine")
    assert machines.at["RoboticArm", "auc_source"] == pytest.approx(0.9701, abs=TOLERANCE)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_command_prints_the_official_score(metric_fixtures, tmp_path):
    out = tmp_path / "results.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kit.metrics",
            str(metric_fixtures / "scores"),
            "--ground-truth",
            str(metric_fixtures),
            "--system",
            "systemA",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "| system | machine | auc_source |" in result.stdout
    assert "| systemA | RoboticArm | 0.9701 |" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("official score (systemA): "))
    assert float(line.split(": ")[1]) == pytest.approx(OFFICIAL_SCORE, abs=TOLERANCE)
    assert pd.read_csv(out)["hmean"].iloc[-1] == pytest.approx(OFFICIAL_SCORE, abs=TOLERANCE)


def test_command_rejects_bad_input_with_exit_code_2(metric_fixtures, tmp_path, capsys):
    assert metrics.main([str(metric_fixtures / "scores"), "--ground-truth", str(tmp_path)]) == 2
    assert "error: ground-truth folder" in capsys.readouterr().err
    assert metrics.main([str(tmp_path / "none"), "--ground-truth", str(metric_fixtures)]) == 2
    assert "score folder" in capsys.readouterr().err
    assert metrics.main([str(tmp_path)]) == 2
    assert "no anomaly_score_<machine>_section_<XX>_test.csv files" in capsys.readouterr().err
    # evaluation names carry no labels: without ground truth the error says what to pass
    assert metrics.main([str(metric_fixtures / "scores")]) == 2
    error = capsys.readouterr().err
    assert "carry no label and domain" in error and "--ground-truth" in error
    assert "section_00_0001.wav" in error


def test_command_evaluates_every_system_of_a_submission_folder(metric_fixtures, tmp_path, capsys):
    submission = tmp_path / "submission"
    shutil.copytree(metric_fixtures / "scores", submission / "Smith_UNI_task2_1")
    shutil.copytree(metric_fixtures / "scores", submission / "Smith_UNI_task2_2")
    broken = submission / "Smith_UNI_task2_2" / "anomaly_score_Scanner_section_00_test.csv"
    broken.write_text(broken.read_text().replace("section_00_0090.wav", "section_00_9090.wav"))

    assert (
        metrics.main(
            [str(submission), "--ground-truth", str(metric_fixtures), "--system", "Smith_UNI_task2_1"]
        )
        == 0
    )
    assert f"official score (Smith_UNI_task2_1): {OFFICIAL_SCORE!r}"[:40] in capsys.readouterr().out

    assert metrics.main([str(submission), "--ground-truth", str(metric_fixtures)]) == 2
    error = capsys.readouterr().err
    assert "system Smith_UNI_task2_2" in error
    assert "Scanner" in error and "section_00_9090.wav" in error

    assert metrics.main([str(submission), "--ground-truth", str(metric_fixtures), "--system", "nobody"]) == 2
    assert "system 'nobody' not found" in capsys.readouterr().err


def test_development_results_score_the_development_test_clips_only():
    rows = []
    for dataset in ("dev", "eval"):
        for split in ("train", "test"):
            for domain in ("source", "target"):
                for label in ("normal", "anomaly"):
                    if split == "train" and label == "anomaly":
                        continue
                    for i in range(3):
                        rows.append(
                            (dataset, "fan", "00", split, f"{split}_{domain}_{label}_{i}.wav", domain, label)
                        )
    frame = pd.DataFrame(
        rows, columns=["dataset", "machine", "section", "split", "file_name", "domain", "label"]
    )
    frame["channel"] = "near"
    frame["score"] = (frame["label"] == "anomaly").astype(float)
    frame.loc[frame["dataset"] == "eval", "label"] = "unknown"  # evaluation clips carry no labels
    table = metrics.development_results({"perfect": frame})
    overall = table[table["machine"] == "overall"].iloc[0]
    assert overall["hmean"] == pytest.approx(1.0) and overall["n_clips"] == 12
