import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import _shared_subdir

from kit import mix
from kit.tools import synth_check

RATE = 16_000
CELLS = [(d, label) for d in ("source", "target") for label in ("normal", "anomaly")]


def _machine_sound(rng: np.random.Generator, seconds: float, hz: float, anomalous: bool) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.1 * np.sin(2 * np.pi * hz * t) + 0.03 * np.sin(2 * np.pi * 3 * hz * t)
    if anomalous:
        tone = tone + 0.05 * rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 4 * t) > 0.9)
    return (tone + 0.005 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny mono root (one dev machine with a full test set, one eval machine) and a noise folder with
    a short recording, an 8-kHz one, a stereo one, a nested one and a non-WAV file to ignore."""
    base = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    mono = base / "mono"
    machine = mono / "dev_data/raw/ToyThing"
    rows = [["file_name", "d1p", "d1v"]]
    names = [("train", "source", "normal", i) for i in range(4)] + [("train", "target", "normal", 0)]
    names += [("test", d, label, i) for d, label in CELLS for i in range(2)]
    for split, domain, label, index in names:
        hz = 200.0 if domain == "source" else 260.0
        name = f"section_00_{domain}_{split}_{label}_{index:04d}_spd_{int(hz)}.wav"
        (machine / split).mkdir(parents=True, exist_ok=True)
        sf.write(machine / split / name, _machine_sound(rng, 1.0, hz, label == "anomaly"), RATE, "PCM_16")
        rows.append([f"ToyThing/{split}/{name}", "spd", str(int(hz))])
    with open(machine / "attributes_00.csv", "w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    (mono / "eval_data/raw/ToyOther/test").mkdir(parents=True)
    sf.write(
        mono / "eval_data/raw/ToyOther/test/section_00_0000.wav", _machine_sound(rng, 0.7, 300, False), RATE
    )
    noise = base / "noise"
    (noise / "hall").mkdir(parents=True)
    sf.write(noise / "short.wav", rng.standard_normal(int(0.3 * RATE)).astype(np.float32) * 0.1, RATE)
    sf.write(noise / "low_rate.wav", rng.standard_normal(8000).astype(np.float32) * 0.2, 8000)
    sf.write(noise / "hall/stereo.wav", rng.standard_normal((RATE, 2)).astype(np.float32) * 0.05, RATE)
    (noise / "README.md").write_text("not audio: ignored")
    return mono, noise


@pytest.fixture(scope="module")
def mixed(inputs, tmp_path_factory) -> Path:
    mono, noise = inputs
    out = tmp_path_factory.mktemp("mixed") / "out"
    mix.mix_dataset(mono, noise, out, seed=3, progress=False)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != mix.RECORD_NAME
    }


def _table(root: Path) -> dict[str, dict]:
    with open(root / mix.CLIPS_CSV_NAME, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_writes_stereo_clips_under_the_same_names_with_the_attribute_tables(inputs, mixed):
    mono, _ = inputs
    sources = sorted(p.relative_to(mono) for p in mono.rglob("*.wav"))
    assert sorted(p.relative_to(mixed) for p in mixed.rglob("*.wav")) == sources
    for relative in sources:
        info, original = sf.info(mixed / relative), sf.info(mono / relative)
        assert (info.channels, info.samplerate, info.subtype) == (2, RATE, "PCM_16")
        assert info.frames == original.frames
    table = "dev_data/raw/ToyThing/attributes_00.csv"
    assert (mixed / table).read_bytes() == (mono / table).read_bytes()
    manifest = json.loads((mixed / mix.RECORD_NAME).read_text())
    assert manifest["complete"] and manifest["clips"] == len(sources) and manifest["seed"] == 3
    assert [f[0] for f in manifest["noise_files"]] == ["hall/stereo.wav", "low_rate.wav", "short.wav"]
    assert not [p for p in mixed.rglob("*") if p.name.startswith(".")]  # no temporaries left


def test_levels_follow_the_table_and_the_far_channel_is_the_noisy_one(mixed):
    table = _table(mixed)
    assert len(table) == 14
    settings = mix.MixSettings()
    for relative, row in table.items():
        stereo, _ = sf.read(mixed / relative, dtype="float32")
        clean = mix.clean_near(mixed, mixed / relative)
        near_snr = 10 * np.log10(np.sum(clean**2) / np.sum((stereo[:, 0] - clean) ** 2))
        assert abs(near_snr - float(row["near_snr_db"])) < 0.1
        low, high = settings.near_snr_db
        assert low <= float(row["near_snr_db"]) <= high and 0 < float(row["output_gain"]) <= 1
        near_corr = np.corrcoef(stereo[:, 0], clean)[0, 1]
        far_corr = np.corrcoef(stereo[:, 1], clean)[0, 1]
        assert far_corr < near_corr - 0.2
        assert len(row["shared_noise"].split(";")) >= 2  # longer than the short recording: joined


def test_deterministic_given_the_seed(inputs, mixed, tmp_path):
    mono, noise = inputs
    mix.mix_dataset(mono, noise, tmp_path / "again", seed=3, progress=False)
    assert _hashes(tmp_path / "again") == _hashes(mixed)
    mix.mix_dataset(mono, noise, tmp_path / "other", seed=4, progress=False)
    clip = "dev_data/raw/ToyThing/train/section_00_source_train_normal_0000_spd_200.wav"
    assert (tmp_path / "other" / clip).read_bytes() != (mixed / clip).read_bytes()


def test_idempotent_and_resumes_an_interrupted_run(inputs, tmp_path):
    mono, noise = inputs
    out = tmp_path / "out"
    first = mix.mix_dataset(mono, noise, out, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert mix.mix_dataset(mono, noise, out, progress=False) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    victim = next((out / "dev_data/raw/ToyThing/test").iterdir())
    original, table = victim.read_bytes(), (out / mix.CLIPS_CSV_NAME).read_text()
    victim.unlink()
    (out / mix.RECORD_NAME).write_text(json.dumps({**first, "complete": False}))
    survivor = out / "eval_data/raw/ToyOther/test/section_00_0000.wav"
    before = survivor.stat().st_mtime_ns
    assert mix.mix_dataset(mono, noise, out, progress=False) == first
    assert victim.read_bytes() == original and survivor.stat().st_mtime_ns == before
    assert (out / mix.CLIPS_CSV_NAME).read_text() == table


def test_refuses_other_parameters_or_foreign_data(inputs, mixed, tmp_path):
    mono, noise = inputs
    with pytest.raises(FileExistsError, match="other parameters"):
        mix.mix_dataset(mono, noise, mixed, seed=9, progress=False)
    foreign = tmp_path / "foreign"
    (foreign / "dev_data").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="did not write"):
        mix.mix_dataset(mono, noise, foreign, progress=False)
    with pytest.raises(ValueError, match="is the mono root"):
        mix.mix_dataset(mono, noise, mono, progress=False)


def test_bad_inputs_name_the_file(inputs, tmp_path):
    mono, noise = inputs
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        mix.mix_dataset(tmp_path / "nothing", noise, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no dev_data/raw or eval_data/raw"):
        mix.mix_dataset(tmp_path, noise, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="noise folder .* is not a folder"):
        mix.mix_dataset(mono, tmp_path / "no_noise", tmp_path / "out", progress=False)
    empty = tmp_path / "empty_noise"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no WAV files below"):
        mix.mix_dataset(mono, empty, tmp_path / "out", progress=False)
    corrupt = tmp_path / "corrupt_noise"
    corrupt.mkdir()
    (corrupt / "broken.wav").write_text("this is not a WAV file")
    with pytest.raises(ValueError, match=r"broken\.wav: not a readable WAV noise recording"):
        mix.mix_dataset(mono, corrupt, tmp_path / "out", progress=False)
    stereo_root = tmp_path / "stereo_root"
    clip = stereo_root / "dev_data/raw/M/train/section_00_source_train_normal_0000_a_1.wav"
    clip.parent.mkdir(parents=True)
    sf.write(clip, np.zeros((RATE, 2), dtype=np.float32), RATE)
    with pytest.raises(ValueError, match=r"section_00_source_train_normal_0000_a_1\.wav: 2 channels"):
        mix.mix_dataset(stereo_root, noise, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="low <= high"):
        mix.MixSettings(near_snr_db=(5.0, 0.0))
    with pytest.raises(ValueError, match="seed must be"):
        mix.mix_dataset(mono, noise, tmp_path / "out", seed=-1, progress=False)


def test_other_sample_rates_are_resampled(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "mono"
    clip = root / "dev_data/raw/M/test/section_00_source_test_normal_0000_a_1.wav"
    clip.parent.mkdir(parents=True)
    sf.write(clip, _machine_sound(rng, 1.0, 200, False)[::2], 8000)  # 1 s at 8 kHz
    noise = tmp_path / "noise"
    noise.mkdir()
    sf.write(noise / "n.wav", rng.standard_normal(44100).astype(np.float32) * 0.1, 44100)
    mix.mix_dataset(root, noise, tmp_path / "out", progress=False)
    info = sf.info(tmp_path / "out" / clip.relative_to(root))
    assert (info.samplerate, info.frames, info.channels) == (RATE, RATE, 2)


def test_synth_check_scores_clean_near_far_and_cancellers_of_a_mix(mixed):
    assert synth_check.channel_names(mixed)[:3] == ["clean", "near", "far"]
    results = synth_check.check(mixed, channels=["clean", "near", "far", "w1", "wl"], progress=False)
    for channel in ("clean", "near", "far", "w1", "wl"):
        assert 0 < results[channel]["official"] <= 1
    assert synth_check.LEVELS not in results  # measured levels are for kit.synth datasets


def test_main_parses_ranges(inputs, tmp_path, capsys):
    mono, noise = inputs
    out = tmp_path / "cli"
    assert mix.main([str(mono), str(noise), str(out), "--seed", "2", "--near-snr-db", "3,4", "--quiet"]) == 0
    manifest = json.loads((out / mix.RECORD_NAME).read_text())
    assert manifest["settings"]["near_snr_db"] == [3.0, 4.0] and manifest["seed"] == 2
    assert all(3.0 <= float(row["near_snr_db"]) <= 4.0 for row in _table(out).values())
    assert "14 stereo clips" in capsys.readouterr().out


@pytest.fixture(scope="module")
def real_recordings() -> tuple[Path, Path]:
    return (
        _shared_subdir("data", "dcase2023_toycar", "dev_data", "raw", "ToyCar"),
        _shared_subdir("data", "mimii_sample"),
    )


def test_mixes_a_real_clip_with_real_noise(real_recordings):
    toycar, mimii = real_recordings
    noise = mix.find_noise_files(mimii)  # the README beside the recordings is ignored
    assert noise and all(f.relative.endswith(".wav") for f in noise)
    path = sorted((toycar / "train").glob("*.wav"))[0]
    info = sf.info(path)
    clip = mix.MonoClip(path, f"dev_data/raw/ToyCar/train/{path.name}", info.frames, info.samplerate)
    plan = mix.plan_clip(clip, noise, mix.MixSettings(), seed=0)
    machine = mix.read_clip(path)
    stereo, gain = mix.render(machine, plan, noise)
    assert stereo.shape == (info.frames, 2) and stereo.dtype == np.float32 and 0 < gain <= 1
    near_noise = stereo[:, 0] - gain * machine
    measured = 10 * np.log10(np.sum((gain * machine) ** 2) / np.sum(near_noise**2))
    assert abs(measured - plan.near_snr_db) < 0.01
