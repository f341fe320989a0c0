import csv
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.signal
import soundfile as sf

from kit import denoise, synth
from kit.synth import signals
from kit.tools import synth_check

DEV_NAME = re.compile(
    r"^section_00_(source|target)_(train|test)_(normal|anomaly)_(\d{4})_(noAttribute|[A-Za-z]+_[^_]+(_[A-Za-z]+_[^_]+)*)\.wav$"
)
EVAL_TEST_NAME = re.compile(r"^section_00_(\d{4})\.wav$")
SMALL = {"scale": 0.1, "machines": ["SynValve", "SynBlower"], "progress": False}  # one dev, one eval, 6 s


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(root, workers=1, **SMALL)
    return root


def _wav_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != synth.RECORD_NAME
    }


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_plans_use_official_names_and_counts_for_every_machine():
    for machine, spec in synth.MACHINES.items():
        plans = synth.plan_machine(machine)
        cells = {}
        for plan in plans:
            match = DEV_NAME.match(plan.official_name)
            assert match, plan.official_name
            domain, split, label, index, attributes = match.group(1, 2, 3, 4, 5)
            assert (domain, split, label, int(index)) == (plan.domain, plan.split, plan.label, plan.index)
            hidden = all(a.hidden for a in spec.attributes)
            assert (attributes == "noAttribute") == hidden
            cells[(split, domain, label)] = cells.get((split, domain, label), 0) + 1
        assert cells == {
            ("train", "source", "normal"): 40,
            ("train", "target", "normal"): 10,
            **{("test", d, label): 10 for d in synth.DOMAINS for label in synth.LABELS},
        }
        test_names = [p.file_name for p in plans if p.split == "test"]
        if spec.dataset == "eval":
            assert sorted(test_names) == [f"section_00_{i:04d}.wav" for i in range(40)]
        else:
            assert test_names == [p.official_name for p in plans if p.split == "test"]


def test_target_domain_uses_other_attribute_values_and_test_cells_cover_them():
    plans = synth.plan_machine("SynMotor")
    source = {p.attributes for p in plans if p.domain == "source"}
    target = {p.attributes for p in plans if p.domain == "target"}
    assert source.isdisjoint(target)
    assert {p.attributes for p in plans if p.domain == "target" and p.split == "train"} == target
    anomalies = [p for p in plans if p.label == "anomaly"]
    assert {p.anomaly for p in anomalies} <= set(synth.MACHINES["SynMotor"].anomalies)
    assert all(synth.SEVERITY_RANGE[0] <= p.severity <= synth.SEVERITY_RANGE[1] for p in anomalies)
    assert all(p.anomaly == "" and p.severity == 0.0 for p in plans if p.label == "normal")


def test_layout_and_wav_format(dataset):
    planned = {p.relative_path for m in SMALL["machines"] for p in synth.plan_machine(m, scale=0.1)}
    wavs = {str(p.relative_to(dataset)) for p in dataset.rglob("*.wav")}
    assert wavs == planned
    assert not [p for p in dataset.rglob("*") if p.name.startswith(".")]  # no temporaries left
    for path in dataset.rglob("*.wav"):
        info = sf.info(path)
        machine = path.parts[-3]
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 2, "PCM_16", "WAV")
        assert info.frames == synth.MACHINES[machine].duration_s * 16000
    assert {spec.duration_s for spec in synth.MACHINES.values()} == {6, 10, 16}


def test_train_and_test_counts(dataset):
    train = [p.name for p in (dataset / "dev_data/raw/SynValve/train").iterdir()]
    assert sum("_target_train_" in name for name in train) == 10
    assert sum("_source_train_" in name for name in train) == 4
    test = [DEV_NAME.match(p.name).group(1, 3) for p in (dataset / "dev_data/raw/SynValve/test").iterdir()]
    assert sorted(test) == sorted((d, label) for d in synth.DOMAINS for label in synth.LABELS)
    eval_train = list((dataset / "eval_data/raw/SynBlower/train").iterdir())
    assert all(p.name.endswith("_noAttribute.wav") for p in eval_train) and len(eval_train) == 14


def test_attribute_tables(dataset):
    rows = _read_csv(dataset / "dev_data/raw/SynValve/attributes_00.csv")
    assert rows[0] == ["file_name", "d1p", "d1v"]
    listed = {row[0] for row in rows[1:]}
    on_disk = {
        f"SynValve/{p.parent.name}/{p.name}" for p in (dataset / "dev_data/raw/SynValve").rglob("*.wav")
    }
    assert listed == on_disk
    for file_name, key, value in rows[1:]:
        assert key == "pat" and file_name.endswith(f"_pat_{value}.wav")
    eval_rows = _read_csv(dataset / "eval_data/raw/SynBlower/attributes_00.csv")
    assert eval_rows[0] == ["file_name", "d1p", "d1v"]
    assert all(
        row[0].startswith("SynBlower/train/") and row[1:] == ["noAttribute", ""] for row in eval_rows[1:]
    )
    assert len(eval_rows) == 1 + 14  # training clips only: the test names are hidden


def test_eval_names_hidden_and_ground_truth_consistent(dataset):
    names = sorted(p.name for p in (dataset / "eval_data/raw/SynBlower/test").iterdir())
    assert names == [f"section_00_{i:04d}.wav" for i in range(4)]
    truth = dataset / "eval_ground_truth"
    stem = "ground_truth_SynBlower_section_00_test.csv"
    labels = dict(_read_csv(truth / "ground_truth_data" / stem))
    domains = dict(_read_csv(truth / "ground_truth_domain" / stem))
    official = dict(_read_csv(truth / "ground_truth_attributes" / stem))
    assert sorted(labels) == sorted(domains) == sorted(official) == names
    assert sorted(labels.values()) == ["0", "0", "1", "1"] and sorted(domains.values()) == [
        "0",
        "0",
        "1",
        "1",
    ]
    table = csv.DictReader((dataset / synth.CLIPS_CSV_NAME).read_text().splitlines())
    clips = {row["path"].rsplit("/", 1)[-1]: row for row in table}
    for name in names:
        match = DEV_NAME.match(official[name] + ".wav")
        domain, split, label = match.group(1, 2, 3)
        assert split == "test" and match.group(5) == "noAttribute"
        assert labels[name] == str(int(label == "anomaly")) and domains[name] == str(int(domain == "target"))
        row = clips[name]
        assert (row["official_name"], row["label"], row["domain"]) == (official[name] + ".wav", label, domain)
        assert (row["anomaly"] != "") == (label == "anomaly")
    assert "\r" not in (truth / "ground_truth_attributes" / stem).read_text()


def test_generation_is_deterministic_whatever_the_workers(dataset, tmp_path):
    synth.generate(tmp_path / "again", workers=2, **SMALL)
    assert _wav_files(tmp_path / "again") == _wav_files(dataset)
    other_seed = tmp_path / "seed1"
    synth.generate(other_seed, seed=1, workers=1, **{**SMALL, "machines": ["SynBlower"]})
    a = dataset / "eval_data/raw/SynBlower/train/section_00_target_train_normal_0000_noAttribute.wav"
    assert a.read_bytes() != (other_seed / a.relative_to(dataset)).read_bytes()


def test_command_line_writes_the_same_dataset(dataset, tmp_path):
    root = tmp_path / "cli"
    command = [sys.executable, "-m", "kit.synth", str(root), "--scale", "0.1", "--workers", "2", "--quiet"]
    done = subprocess.run([*command, "--machines", *SMALL["machines"]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("36 clips, 4 min of audio")  # 2 machines x (4 + 10 + 4) clips of 6 s
    assert _wav_files(root) == _wav_files(dataset)


def _db(signal: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(np.square(signal, dtype=np.float64)) / np.sum(np.square(reference))))


def _levels(machine: str, count: int = 3) -> np.ndarray:
    """(near SNR, far SNR, far machine vs near machine, far noise vs near noise) in dB, per clip."""
    rows = []
    for plan in synth.plan_machine(machine, scale=0.1)[:count]:
        clip = synth.render_clip(plan, seed=0)
        near_noise, far_noise = clip.near - clip.near_machine, clip.far - clip.far_machine
        rows.append(
            (
                _db(clip.near_machine, near_noise),
                _db(clip.far_machine, far_noise),
                _db(clip.far_machine, clip.near_machine),
                _db(far_noise, near_noise),
            )
        )
    return np.array(rows)


@pytest.mark.parametrize("machine", list(synth.MACHINES))
def test_measured_levels_follow_the_machine_types_ranges(machine):
    spec, levels = synth.MACHINES[machine], _levels(machine)
    tolerance = 0.01  # levels are set by RMS, exactly
    for column, (low, high) in zip(
        (0, 2, 3), (spec.near_snr_db, spec.far_machine_db, synth.FAR_NOISE_GAIN_DB)
    ):
        assert np.all((levels[:, column] >= low - tolerance) & (levels[:, column] <= high + tolerance))
    assert np.all(levels[:, 1] < levels[:, 0] - 4.0)  # the far channel is the noisier one


def test_noise_matters_near_and_far_leakage_differs_between_machines():
    near_snr = {m: _levels(m)[:, 0].mean() for m in synth.MACHINES}
    leakage = {m: _levels(m)[:, 2].mean() for m in synth.MACHINES}
    assert min(near_snr.values()) < 5.0 and max(near_snr.values()) > 8.0  # 2026-like: some near 0-5 dB
    assert leakage["SynValve"] > -3.5 and leakage["SynMotor"] < -14.5  # far holds much / little machine
    assert max(leakage.values()) - min(leakage.values()) > 10.0


def test_near_and_far_noise_come_through_different_paths():
    plan = synth.plan_machine("SynMotor", scale=0.1)[0]
    clip = synth.render_clip(plan, seed=0)
    near, far = clip.near - clip.near_machine, clip.far - clip.far_machine
    gain = np.dot(near, far) / np.dot(far, far)
    assert _db(near - gain * far, near) > -3.0  # not one signal up to a gain: delay and filters differ
    lags = np.arange(-400, 401)
    xcorr = [np.dot(near[400 + lag : len(near) - 400 + lag], far[400 : len(far) - 400]) for lag in lags]
    delay = lags[int(np.argmax(np.abs(xcorr)))]
    low, high = synth.NOISE_PATH_DELAY_S
    assert low * 16000 - 1 <= delay <= high * 16000 + 1  # the near microphone hears the noise later
    # coherent enough to be a reference, not perfectly: each microphone has its own diffuse noise
    freqs, coherence = scipy.signal.coherence(near, far, fs=16000, nperseg=1024)
    band = (freqs > 100) & (freqs < 2000)  # where the environment has its energy
    assert 0.5 < np.median(coherence[band]) and np.max(coherence) < 0.99


def test_the_written_file_is_the_re_rendered_clip(dataset):
    for plan in synth.plan_machine("SynValve", scale=0.1)[::5]:
        clip = synth.render_clip(plan, seed=0)
        written, _ = sf.read(dataset / plan.relative_path, dtype="float32")
        np.testing.assert_allclose(written[:, 0], clip.near, atol=1.0 / 32768)
        np.testing.assert_allclose(written[:, 1], clip.far, atol=1.0 / 32768)
        clean = synth_check.clean_source(dataset)(dataset / plan.relative_path)
        np.testing.assert_allclose(clean, clip.near_machine, atol=1.0 / 32768)
        low, high = synth.MACHINES["SynValve"].near_snr_db
        assert low - 0.1 < _db(clean, written[:, 0] - clean) < high + 0.1


def test_attributes_and_anomalies_change_the_sound():
    plan = synth.plan_machine("SynMotor", scale=0.1)[0]

    def spectrum(p):
        machine = synth.render_clip(p, seed=0).near_machine
        return np.fft.rfftfreq(len(machine), 1 / 16000), np.abs(np.fft.rfft(machine)) ** 2

    for f0 in (40.0, 60.0, 86.0):  # the speed attribute sets the fundamental
        freqs, power = spectrum(dataclasses.replace(plan, settings=(("f0", f0), ("load", 0.0))))
        low = freqs < 120
        assert abs(freqs[low][np.argmax(power[low])] - f0) < 0.03 * f0
    normal_freqs, normal = spectrum(plan)
    band = (normal_freqs > 2000) & (normal_freqs < 5000)
    gains = [
        spectrum(dataclasses.replace(plan, label="anomaly", anomaly="bearing", severity=s))[1][band].sum()
        / normal[band].sum()
        for s in (0.05, 0.5, 1.0)
    ]
    assert gains[0] < gains[1] < gains[2] and gains[2] > 2.0  # graded: mild faults barely show


def test_wavetable_reads_phases_just_below_a_whole_cycle():
    phases = np.array([0.0, 0.25, 1.0 - 1e-12, 2.0 - 1e-9, 1e6 - 1e-7])
    wave = signals.wavetable(phases, np.array([1.0]), np.random.default_rng(0))
    assert wave.shape == (5,) and np.all(np.isfinite(wave)) and abs(wave[2] - wave[0]) < 1e-3


def test_mono_layout_holds_the_near_channel(dataset, tmp_path):
    summary = synth.generate(
        tmp_path / "mono", layout="mono", workers=1, **{**SMALL, "machines": ["SynValve"]}
    )
    assert summary["channels"] == 1 and summary["layout"] == "mono"
    stereo_files = sorted((dataset / "dev_data/raw/SynValve").rglob("*.wav"))
    mono_files = sorted((tmp_path / "mono/dev_data/raw/SynValve").rglob("*.wav"))
    assert [p.relative_to(dataset) for p in stereo_files] == [
        p.relative_to(tmp_path / "mono") for p in mono_files
    ]
    mono, rate = sf.read(mono_files[0], dtype="int16")
    stereo, _ = sf.read(stereo_files[0], dtype="int16")
    assert rate == 16000 and mono.ndim == 1
    np.testing.assert_array_equal(mono, stereo[:, 0])


def test_idempotent_and_resumes_an_interrupted_run(tmp_path):
    root = tmp_path / "data"
    options = {**SMALL, "machines": ["SynBlower"], "workers": 1}
    first = synth.generate(root, **options)
    assert first["complete"] and first["clips"] == 18 and first["bytes"] > 0
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert synth.generate(root, **options) == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    # an interrupted run: the record not complete, one clip missing
    victim = next((root / "eval_data/raw/SynBlower/test").iterdir())
    original = victim.read_bytes()
    victim.unlink()
    manifest = json.loads((root / synth.RECORD_NAME).read_text())
    (root / synth.RECORD_NAME).write_text(json.dumps({**manifest, "complete": False}))
    assert synth.generate(root, **options) == first
    assert victim.read_bytes() == original
    # a dataset written when the record had its earlier name is still this dataset
    clips = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}
    (root / synth.RECORD_NAME).rename(root / synth.LEGACY_RECORD_NAME)
    assert synth.generate(root, **options) == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")} == clips  # nothing written again


def test_refuses_other_parameters_or_foreign_data(tmp_path):
    root = tmp_path / "data"
    synth.generate(root, workers=1, **{**SMALL, "machines": ["SynBlower"]})
    with pytest.raises(FileExistsError, match="other parameters"):
        synth.generate(root, seed=3, workers=1, **{**SMALL, "machines": ["SynBlower"]})
    real = tmp_path / "real"
    (real / "dev_data/raw/fan").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="did not write"):
        synth.generate(real, **SMALL)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        synth.generate(tmp_path / "file", **SMALL)
    (root / synth.RECORD_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        synth.generate(root, workers=1, **{**SMALL, "machines": ["SynBlower"]})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": -1.0}, "scale must be a positive"),
        ({"scale": 0}, "scale must be a positive"),
        ({"scale": float("nan")}, "scale must be a positive"),
        ({"layout": "stereo"}, "unknown layout 'stereo'"),
        ({"machines": ["fan"]}, r"unknown or no synthetic machines \['fan'\]"),
        ({"machines": []}, "unknown or no synthetic machines"),
        ({"seed": -2}, "seed must be a non-negative integer"),
        ({"workers": 0}, "workers must be at least 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        synth.generate(tmp_path / "data", **{"progress": False, **options})
    assert not (tmp_path / "data").exists()


def test_unknown_machine_plan_raises():
    with pytest.raises(ValueError, match="unknown synthetic machine 'Fan'"):
        synth.plan_machine("Fan")


def test_check_scores_every_channel_of_a_development_set(dataset):
    assert synth_check.channel_names(dataset) == ["clean", "near", "far", *denoise.CANCELLERS]
    channels = ["clean", "near", "far", "w1", "wl"]
    results = synth_check.check(dataset, channels=channels, progress=False)
    assert [c for c in results if c != synth_check.LEVELS] == channels
    for channel in channels:
        result = results[channel]
        table = result["sections"]
        assert list(table["machine"]) == ["SynValve"]
        values = table[["auc_source", "auc_target", "pauc"]].to_numpy()
        assert np.all((values >= 0) & (values <= 1)) and 0 < result["official"] <= 1
        accuracy, chance = result["attributes"]["SynValve"]
        assert 0 <= accuracy <= 1 and 0 < chance < 1
        assert set(result["kinds"]["machine"]) == {"SynValve"}
    levels = results[synth_check.LEVELS]
    assert list(levels["machine"]) == ["SynValve"]
    near_min, _, near_max = (float(v) for v in levels["near SNR"].iloc[0].split(" / "))
    low, high = synth.MACHINES["SynValve"].near_snr_db
    assert low - 0.1 <= near_min <= near_max <= high + 0.1
    text = synth_check.report(results)
    assert "near channel: official score" in text and "measured levels" in text
    assert list(synth_check.summary_table(results)["channel"]) == channels


def test_channels_of_a_mono_dataset_and_of_an_older_generator(dataset, tmp_path):
    mono = tmp_path / "mono"
    synth.generate(mono, layout="mono", workers=1, **{**SMALL, "machines": ["SynValve"]})
    assert synth_check.channel_names(mono) == ["clean", "near"]
    with pytest.raises(ValueError, match="needs a stereo clip"):
        synth_check.check(mono, channels=["far"], progress=False)
    manifest = json.loads((mono / synth.RECORD_NAME).read_text())
    (mono / synth.RECORD_NAME).write_text(json.dumps({**manifest, "generator_version": 1}))
    with pytest.raises(ValueError, match="cannot be re-rendered"):
        synth_check.check(mono, channels=["clean"], progress=False)
    with pytest.raises(ValueError, match="unknown or no channels"):
        synth_check.check(dataset, channels=["wiener"], progress=False)


def test_calibration_failures_name_the_missed_condition():
    def result(official, source, target):
        return {
            "official": official,
            "sections": pd.DataFrame({"auc_source": [source], "auc_target": [target]}),
        }

    good = {"clean": result(0.8, 0.9, 0.7), "near": result(0.7, 0.8, 0.6), "far": result(0.5, 0.6, 0.4)}
    assert synth_check.calibration_failures(good) == []
    failures = synth_check.calibration_failures(
        {"clean": result(0.92, 0.9, 0.9), "near": result(0.9, 0.6, 0.7), "far": result(0.95, 0.9, 0.9)}
    )
    assert len(failures) == 4
    assert "outside [0.55, 0.8]" in failures[0] and "target" in failures[1] and "far" in failures[2]
    assert "clean signal not clearly easier" in failures[3]


def test_check_rejects_missing_or_misnamed_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="no development set"):
        synth_check.check(tmp_path)
    bad = tmp_path / "dev_data/raw/fan/train/clip.wav"
    bad.parent.mkdir(parents=True)
    sf.write(bad, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="not an official development clip name"):
        synth_check.check(tmp_path)
    with pytest.raises(ValueError, match="unknown metric"):
        synth_check.check(tmp_path, metric="manhattan")
