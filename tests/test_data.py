"""Tests for kit.data: index, attributes, audio loading, length policies, channels, padding, labels.

Tiny datasets are written to tmp folders: a 2026-style stereo layout (with attributes_00.csv and
hidden evaluation test names) and a 2023-style mono layout (earlier-year CSV, one 44.1 kHz clip).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from kit import data
from kit.data import DatasetError

SR = 16000
TOYCAR_ATTR = "car_C2_spd_5_mic_2_mic_1"


def write_clip(path, seconds=0.25, channels=2, sample_rate=SR, seed=0):
    """A float WAV whose near channel is a 440 Hz sine and far channel low-level noise."""
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    near = 0.5 * np.sin(2 * np.pi * 440 * t)
    far = 0.05 * np.random.default_rng(seed).standard_normal(n)
    samples = np.stack([near, far], axis=1) if channels == 2 else near
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), sample_rate, subtype="FLOAT")
    return path


def write_csv(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def stereo_root(tmp_path_factory):
    """2026 layout: stereo 16 kHz, attributes_00.csv, hidden eval test names."""
    root = tmp_path_factory.mktemp("dcase2026")
    dev = root / "dev_data" / "raw"
    toycar = dev / "ToyCarEmu"
    write_clip(toycar / "train" / f"section_00_source_train_normal_0000_{TOYCAR_ATTR}.wav", 0.25, seed=1)
    write_clip(
        toycar / "train" / "section_00_target_train_normal_0000_car_C3_spd_6_mic_2_mic_1.wav", 0.3, seed=2
    )
    write_clip(toycar / "test" / f"section_00_source_test_anomaly_0000_{TOYCAR_ATTR}.wav", 0.25, seed=3)
    write_csv(
        toycar / "attributes_00.csv",
        [
            "file_name,key_1,value_1,key_2,value_2,key_3,value_3,key_4,value_4",
            f"section_00_source_train_normal_0000_{TOYCAR_ATTR}.wav,car,C2,spd,5,mic,2,mic,1",
            "section_00_target_train_normal_0000_car_C3_spd_6_mic_2_mic_1.wav,car,C3,spd,6,mic,2,mic,1",
        ],
    )
    write_clip(dev / "fan" / "train" / "section_00_source_train_normal_0000_spd_1.wav", 0.2, seed=4)
    write_clip(dev / "fan" / "test" / "section_00_target_test_normal_0000_spd_1.wav", 0.2, seed=5)
    write_clip(
        dev / "bearingEmu" / "train" / "section_00_source_train_normal_0000_noAttribute.wav", 0.2, seed=6
    )
    sander = root / "eval_data" / "raw" / "Sander"
    write_clip(sander / "train" / "section_00_source_train_normal_0000_grit_80.wav", 0.2, seed=7)
    write_clip(sander / "test" / "section_00_0000.wav", 0.2, seed=8)
    write_clip(sander / "test" / "section_00_0001.wav", 0.2, seed=9)
    write_csv(sander / "attributes_00.csv", ["file_name,d1p,d1v", "section_00_0001.wav,grit,120"])
    return root


@pytest.fixture(scope="module")
def stereo_index(stereo_root):
    return data.build_index(stereo_root, progress=False)


@pytest.fixture(scope="module")
def mono_root(tmp_path_factory):
    """2023 layout: mono, earlier-year attribute CSV with path prefixes, one 44.1 kHz clip."""
    root = tmp_path_factory.mktemp("dcase2023")
    dev = root / "dev_data" / "raw"
    write_clip(dev / "fan" / "train" / "section_00_source_train_normal_0000_m-n_W.wav", 0.2, channels=1)
    write_csv(
        dev / "fan" / "attributes_00.csv",
        ["file_name,d1p,d1v,d2p,d2v", "fan/train/section_00_source_train_normal_0000_m-n_W.wav,m-n,W,,"],
    )
    gearbox = dev / "gearbox"
    write_clip(gearbox / "train" / "section_00_source_train_normal_0000_volt_1.0_wt_30.wav", 0.2, channels=1)
    write_clip(
        gearbox / "test" / "section_00_source_test_anomaly_0000_volt_1.0_wt_30.wav",
        0.2,
        channels=1,
        sample_rate=44100,
    )
    vacuum = root / "eval_data" / "raw" / "Vacuum"
    write_clip(vacuum / "train" / "section_00_source_train_normal_0000_noAttribute.wav", 0.2, channels=1)
    write_clip(vacuum / "test" / "section_00_0000.wav", 0.2, channels=1)
    return root


@pytest.fixture(scope="module")
def mono_index(mono_root):
    return data.build_index(mono_root, progress=False)


def row_of(index, file_name, machine=None):
    rows = index[index["file_name"] == file_name]
    if machine is not None:
        rows = rows[rows["machine"] == machine]
    assert len(rows) == 1
    return rows.iloc[0]


# ----------------------------------------------------------------------------------------------
# Index


def test_index_columns_and_values_stereo(stereo_root, stereo_index):
    index = stereo_index
    assert tuple(index.columns) == data.INDEX_COLUMNS
    assert len(index) == 9
    name = f"section_00_source_train_normal_0000_{TOYCAR_ATTR}.wav"
    row = row_of(index, name)
    assert row["path"] == str(stereo_root / "dev_data" / "raw" / "ToyCarEmu" / "train" / name)
    assert (row["dataset"], row["machine"], row["section"], row["split"]) == (
        "dev",
        "ToyCarEmu",
        "00",
        "train",
    )
    assert (row["domain"], row["label"], row["attributes"]) == ("source", "normal", TOYCAR_ATTR)
    assert json.loads(row["attribute_dict"]) == {"car": "C2", "spd": "5", "mic": "2", "mic_2": "1"}
    assert list(json.loads(row["attribute_dict"])) == ["car", "spd", "mic", "mic_2"]
    assert row["duration"] == pytest.approx(0.25)
    assert (row["channels"], row["sample_rate"]) == (2, SR)

    anomaly = row_of(index, f"section_00_source_test_anomaly_0000_{TOYCAR_ATTR}.wav")
    assert (anomaly["split"], anomaly["label"], anomaly["domain"]) == ("test", "anomaly", "source")
    target = row_of(index, "section_00_target_test_normal_0000_spd_1.wav")
    assert (target["machine"], target["domain"], target["label"]) == ("fan", "target", "normal")
    assert json.loads(target["attribute_dict"]) == {"spd": "1"}
    plain = row_of(index, "section_00_source_train_normal_0000_noAttribute.wav", machine="bearingEmu")
    assert (plain["attributes"], json.loads(plain["attribute_dict"])) == ("noAttribute", {})


def test_index_hidden_eval_names(stereo_index):
    hidden = stereo_index[stereo_index["file_name"].str.fullmatch(r"section_00_\d{4}\.wav")]
    assert list(hidden["file_name"]) == ["section_00_0000.wav", "section_00_0001.wav"]
    assert set(hidden["dataset"]) == {"eval"} and set(hidden["machine"]) == {"Sander"}
    assert set(hidden["split"]) == {"test"}
    assert set(hidden["domain"]) == {"unknown"} and set(hidden["label"]) == {"unknown"}
    assert set(hidden["attributes"]) == {""}
    # The CSV fills in the attributes a hidden name cannot carry.
    assert [json.loads(d) for d in hidden["attribute_dict"]] == [{}, {"grit": "120"}]


def test_index_sorted_and_deterministic(stereo_root, stereo_index):
    keys = ["dataset", "machine", "section", "split", "file_name"]
    assert stereo_index.equals(stereo_index.sort_values(keys).reset_index(drop=True))
    pd.testing.assert_frame_equal(data.build_index(stereo_root, progress=False), stereo_index)
    dev_only = data.build_index(stereo_root, datasets=("dev",), progress=False)
    assert set(dev_only["dataset"]) == {"dev"} and len(dev_only) == 6


def test_index_mono_2023_layout(mono_index):
    assert tuple(mono_index.columns) == data.INDEX_COLUMNS
    assert set(mono_index["channels"]) == {1}
    fan = row_of(mono_index, "section_00_source_train_normal_0000_m-n_W.wav")
    assert json.loads(fan["attribute_dict"]) == {"m-n": "W"}
    gearbox = row_of(mono_index, "section_00_source_test_anomaly_0000_volt_1.0_wt_30.wav")
    assert json.loads(gearbox["attribute_dict"]) == {"volt": "1.0", "wt": "30"}
    assert gearbox["sample_rate"] == 44100
    assert gearbox["duration"] == pytest.approx(0.2)
    hidden = row_of(mono_index, "section_00_0000.wav")
    assert (hidden["dataset"], hidden["domain"], hidden["label"]) == ("eval", "unknown", "unknown")


def test_index_without_probe(stereo_root):
    index = data.build_index(stereo_root, probe_audio=False, progress=False)
    assert tuple(index.columns) == data.INDEX_COLUMNS
    assert index["duration"].isna().all() and index["channels"].isna().all()
    with pytest.raises(DatasetError, match="probe_audio=True"):
        data.check_index(index)


def test_check_index(stereo_index, mono_index):
    data.check_index(stereo_index)
    with pytest.raises(DatasetError, match=r"section_00_.*\.wav is mono"):
        data.check_index(mono_index)
    with pytest.raises(DatasetError, match=r"anomaly_0000_volt_1\.0_wt_30\.wav has sample rate 44100"):
        data.check_index(mono_index, require_stereo=False)
    data.check_index(mono_index, require_stereo=False, allow_resample=True)


def test_save_and_load_index_roundtrip(tmp_path, stereo_root, stereo_index):
    path = data.save_index(stereo_index, tmp_path / "run")
    assert path == tmp_path / "run" / "index.csv"
    assert [p.name for p in path.parent.iterdir()] == ["index.csv"]  # no temporary left behind
    loaded = data.load_index(path)
    pd.testing.assert_frame_equal(loaded, stereo_index)
    assert loaded["section"].iloc[0] == "00"
    pd.testing.assert_frame_equal(data.load_index(tmp_path / "run"), stereo_index)

    unprobed = data.build_index(stereo_root, probe_audio=False, progress=False)
    loaded = data.load_index(data.save_index(unprobed, tmp_path / "unprobed"))
    pd.testing.assert_frame_equal(loaded, unprobed)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_index(tmp_path / "nowhere" / "index.csv")


# ----------------------------------------------------------------------------------------------
# File names and attributes


def test_parse_attributes():
    assert data.parse_attributes("spd_1") == {"spd": "1"}
    assert data.parse_attributes("noAttribute") == {}
    assert data.parse_attributes("") == {}
    parsed = data.parse_attributes(TOYCAR_ATTR)
    assert list(parsed.items()) == [("car", "C2"), ("spd", "5"), ("mic", "2"), ("mic_2", "1")]
    assert data.parse_attributes("mic_1_mic_2_mic_3") == {"mic": "1", "mic_2": "2", "mic_3": "3"}
    assert data.parse_attributes("v1pat_00_v2pat_none") == {"v1pat": "00", "v2pat": "none"}
    for bad in ("spd", "spd_1_car", "1_2", "spd__car_1"):
        with pytest.raises(DatasetError, match="key_value pairs"):
            data.parse_attributes(bad)


def test_parse_file_name():
    fields = data.parse_file_name("section_00_target_test_anomaly_0042_pro_A.wav")
    assert fields == {
        "section": "00",
        "domain": "target",
        "split": "test",
        "label": "anomaly",
        "attributes": "pro_A",
    }
    assert data.parse_file_name("section_01_0199.wav")["domain"] == "unknown"
    with pytest.raises(DatasetError, match=r"'normal_0000\.wav'.*section_<XX>_<source\|target>"):
        data.parse_file_name("normal_0000.wav")


def test_read_attribute_table_formats(tmp_path):
    early = tmp_path / "early.csv"
    write_csv(early, ["file_name,d1p,d1v,d2p,d2v", "fan/train/a.wav,m-n,W,,", "x/test/b.wav,noAttribute,,,"])
    assert data.read_attribute_table(early) == {"a.wav": [("m-n", "W")], "b.wav": []}
    headerless = tmp_path / "headerless.csv"
    write_csv(headerless, ["c.wav,mic,2,mic,1"])
    assert data.read_attribute_table(headerless) == {"c.wav": [("mic", "2"), ("mic", "1")]}
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DatasetError, match="binary.csv"):
        data.read_attribute_table(binary)


# ----------------------------------------------------------------------------------------------
# Bad layouts and files: every error names the offending path


def make_layout(root, files):
    for rel in files:
        write_clip(root / rel, 0.1)
    return root


TRAIN_CLIP = "dev_data/raw/fan/train/section_00_source_train_normal_0000_spd_1.wav"


def test_missing_root_and_dataset_folders(tmp_path):
    with pytest.raises(DatasetError, match="missing_root"):
        data.build_index(tmp_path / "missing_root", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds none of: dev_data, eval_data"):
        data.build_index(tmp_path / "empty", progress=False)
    (tmp_path / "noraw" / "dev_data").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"noraw/dev_data/raw holds no machine folders"):
        data.build_index(tmp_path / "noraw", progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_index(tmp_path / "empty", datasets=("train",), progress=False)


def test_machine_without_train(tmp_path):
    root = make_layout(tmp_path, ["dev_data/raw/fan/test/section_00_source_test_normal_0000_spd_1.wav"])
    with pytest.raises(DatasetError, match=r"raw/fan has no 'train' folder"):
        data.build_index(root, progress=False)


def test_empty_train_and_empty_section(tmp_path):
    (tmp_path / "a" / "dev_data" / "raw" / "fan" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty section: .*fan/train holds no WAV"):
        data.build_index(tmp_path / "a", progress=False)
    root = make_layout(
        tmp_path / "b", [TRAIN_CLIP, "dev_data/raw/fan/test/section_01_source_test_normal_0000_spd_1.wav"]
    )
    with pytest.raises(
        DatasetError, match=r"section 01 of fan .*section_01_source_test_normal_0000_spd_1\.wav"
    ):
        data.build_index(root, progress=False)


def test_bad_file_names(tmp_path):
    root = make_layout(tmp_path / "a", [TRAIN_CLIP, "dev_data/raw/fan/train/fan_0001.wav"])
    with pytest.raises(DatasetError, match=r"fan/train/fan_0001\.wav.*expected section_<XX>_"):
        data.build_index(root, progress=False)
    root = make_layout(tmp_path / "b", [TRAIN_CLIP, "dev_data/raw/fan/train/section_00_0000.wav"])
    with pytest.raises(DatasetError, match=r"section_00_0000\.wav: the name says split 'test'"):
        data.build_index(root, progress=False)
    root = make_layout(tmp_path / "c", ["dev_data/raw/fan/train/section_00_source_train_normal_0000_spd.wav"])
    with pytest.raises(DatasetError, match=r"normal_0000_spd\.wav: attribute string 'spd'"):
        data.build_index(root, progress=False)


def test_attribute_csv_mismatch(tmp_path):
    root = make_layout(tmp_path, [TRAIN_CLIP])
    write_csv(
        root / "dev_data/raw/fan/attributes_00.csv",
        ["file_name,d1p,d1v", "section_00_source_train_normal_0000_spd_1.wav,spd,2"],
    )
    with pytest.raises(
        DatasetError, match=r"normal_0000_spd_1\.wav: attributes in the file name .* disagree"
    ):
        data.build_index(root, progress=False)


def test_attribute_csv_rescues_unusual_names(tmp_path):
    name = "section_00_source_train_normal_0000_spd.wav"
    root = make_layout(tmp_path, [f"dev_data/raw/fan/train/{name}"])
    write_csv(root / "dev_data/raw/fan/attributes_00.csv", ["file_name,d1p,d1v", f"{name},spd,fast"])
    index = data.build_index(root, progress=False)
    assert json.loads(index["attribute_dict"].iloc[0]) == {"spd": "fast"}


# One root per earlier year's layout and naming (kit.data.NAMING_BY_YEAR), mono like those releases.
LEGACY_ROOTS = {
    "2020": [
        "dev_data/fan/train/normal_id_00_00000000.wav",
        "dev_data/fan/train/normal_id_02_00000000.wav",
        "dev_data/fan/test/normal_id_00_00000001.wav",
        "dev_data/fan/test/anomaly_id_02_00000000.wav",
        "eval_data/fan/train/normal_id_01_00000000.wav",
        "eval_data/fan/test/id_01_00000000.wav",
    ],
    "2021": [
        "dev_data/gearbox/train/section_00_source_train_normal_0000_0_g_25_mm_2000_mV_none.wav",
        "dev_data/gearbox/train/section_00_target_train_normal_0000_1_g_30_mm_2000_mV_none.wav",
        "dev_data/gearbox/source_test/section_00_source_test_normal_0000.wav",
        "dev_data/gearbox/target_test/section_00_target_test_anomaly_0000.wav",
        "eval_data/gearbox/train/section_03_source_train_normal_0000_strength_1_ambient.wav",
        "eval_data/gearbox/source_test/section_03_source_test_0000.wav",
        "eval_data/gearbox/target_test/section_03_target_test_0000.wav",
    ],
    "2022": [
        "dev_data/fan/train/section_00_source_train_normal_0000_m-n_W.wav",
        "dev_data/fan/train/section_00_target_train_normal_0000_m-n_X.wav",
        "dev_data/fan/test/section_00_source_test_anomaly_0000_m-n_W.wav",
        "eval_data/fan/train/section_03_source_train_normal_0000_m-n_W.wav",
        "eval_data/fan/test/section_03_test_0000.wav",
    ],
}
# (file name) -> (section, domain, split, label, attribute_dict) the index must give
LEGACY_EXPECTED = {
    "normal_id_02_00000000.wav": ("02", "source", "train", "normal", {}),
    "anomaly_id_02_00000000.wav": ("02", "source", "test", "anomaly", {}),
    "id_01_00000000.wav": ("01", "source", "test", "unknown", {}),
    "section_00_source_train_normal_0000_0_g_25_mm_2000_mV_none.wav": (
        "00",
        "source",
        "train",
        "normal",
        {"attribute": "0_g_25_mm_2000_mV_none"},
    ),
    "section_00_target_test_anomaly_0000.wav": ("00", "target", "test", "anomaly", {}),
    "section_03_target_test_0000.wav": ("03", "target", "test", "unknown", {}),
    "section_03_source_train_normal_0000_strength_1_ambient.wav": (
        "03",
        "source",
        "train",
        "normal",
        {"attribute": "strength_1_ambient"},
    ),
    "section_00_source_test_anomaly_0000_m-n_W.wav": ("00", "source", "test", "anomaly", {"m-n": "W"}),
    "section_03_test_0000.wav": ("03", "unknown", "test", "unknown", {}),
    "section_00_target_train_normal_0000_m-n_X.wav": ("00", "target", "train", "normal", {"m-n": "X"}),
}


@pytest.mark.parametrize("year", sorted(LEGACY_ROOTS))
def test_index_of_the_2020_to_2022_layouts_and_names(tmp_path, year):
    files = LEGACY_ROOTS[year]
    for rel in files:
        write_clip(tmp_path / rel, 0.1, channels=1)
    index = data.build_index(tmp_path, progress=False)
    assert sorted(index["file_name"]) == sorted(rel.rsplit("/", 1)[1] for rel in files)
    assert set(index["dataset"]) == {"dev", "eval"} and (index["channels"] == 1).all()
    checked = 0
    for name, (section, domain, split, label, attributes) in LEGACY_EXPECTED.items():
        rows = index[index["file_name"] == name]
        if len(rows):
            row = rows.iloc[0]
            assert (row["section"], row["domain"], row["split"], row["label"]) == (
                section,
                domain,
                split,
                label,
            )
            assert json.loads(row["attribute_dict"]) == attributes
            checked += 1
    assert checked >= 3
    # the example names of this year in the index's own table parse as well
    layout, train_name, hidden_name = data.NAMING_BY_YEAR[year]
    assert data.parse_file_name(hidden_name)["label"] == "unknown"
    assert data.parse_file_name(train_name)["label"] == "normal"


def test_2021_test_folders_must_agree_with_the_domain_in_the_name(tmp_path):
    make_layout(
        tmp_path,
        [
            "dev_data/fan/train/section_00_source_train_normal_0000_strength_1.wav",
            "dev_data/fan/source_test/section_00_target_test_normal_0000.wav",
        ],
    )
    with pytest.raises(DatasetError, match=r"says domain 'target' but the clip is in 'source_test'"):
        data.build_index(tmp_path, progress=False)


def test_free_text_attributes_only_in_the_earlier_layouts(tmp_path):
    """A 2023-on root (raw/) still refuses attributes that are not key_value pairs."""
    root = make_layout(
        tmp_path, ["dev_data/raw/fan/train/section_00_source_train_normal_0000_strength_1_x.wav"]
    )
    with pytest.raises(DatasetError, match="not a sequence of key_value pairs"):
        data.build_index(root, progress=False)


def test_corrupt_wav_in_index(tmp_path):
    root = make_layout(tmp_path, [TRAIN_CLIP])
    bad = root / "dev_data/raw/fan/train/section_00_source_train_normal_0001_spd_1.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    with pytest.raises(DatasetError, match=r"corrupt WAV .*normal_0001_spd_1\.wav"):
        data.build_index(root, progress=False)


# ----------------------------------------------------------------------------------------------
# Audio


def test_load_audio_channels(stereo_index):
    path = row_of(stereo_index, "section_00_source_train_normal_0000_spd_1.wav")["path"]
    stored, _ = sf.read(path, dtype="float32", always_2d=True)
    near = data.load_audio(path, "near")
    far = data.load_audio(path, "far")
    both = data.load_audio(path, "both")
    assert near.dtype == far.dtype == both.dtype == np.float32
    assert near.shape == far.shape == (3200,) and both.shape == (2, 3200)
    np.testing.assert_array_equal(near, stored[:, 0])
    np.testing.assert_array_equal(far, stored[:, 1])
    np.testing.assert_array_equal(both, stored.T)
    assert not np.allclose(near, far)
    with pytest.raises(ValueError, match="unknown channel 'left'"):
        data.load_audio(path, "left")


def test_load_audio_mono(mono_index):
    path = row_of(mono_index, "section_00_source_train_normal_0000_m-n_W.wav")["path"]
    assert data.load_audio(path, "near").shape == (3200,)
    for channel in ("far", "both"):
        with pytest.raises(DatasetError, match=r"mono clip .*m-n_W\.wav has no far channel"):
            data.load_audio(path, channel)


def test_load_audio_resamples(tmp_path):
    path = tmp_path / "tone.wav"
    n = 22050  # 0.5 s at 44.1 kHz
    sf.write(path, np.sin(2 * np.pi * 1000 * np.arange(n) / 44100).astype(np.float32), 44100, subtype="FLOAT")
    wave = data.load_audio(path)
    assert wave.shape == (8000,) and wave.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    assert np.argmax(spectrum) * SR / len(wave) == pytest.approx(1000, abs=4)
    assert data.load_audio(path, sample_rate=None).shape == (n,)


def test_load_audio_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        data.load_audio(tmp_path / "absent.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DatasetError, match="corrupt.wav"):
        data.load_audio(corrupt)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.0, np.nan, 0.1], dtype=np.float32), SR, subtype="FLOAT")
    with pytest.raises(DatasetError, match="nan.wav holds NaN"):
        data.load_audio(nan)
    quad = tmp_path / "quad.wav"
    sf.write(quad, np.zeros((10, 4), dtype=np.float32), SR, subtype="FLOAT")
    with pytest.raises(DatasetError, match="quad.wav has 4 channels"):
        data.load_audio(quad)


def test_load_real_mimii_clip(mimii_sample):
    wave = data.load_audio(mimii_sample / "fan_id00" / "normal" / "00000000.wav")
    assert wave.shape == (160000,) and wave.dtype == np.float32
    assert np.isfinite(wave).all() and 0 < np.abs(wave).max() <= 1
    with pytest.raises(DatasetError, match="00000000.wav has no far channel"):
        data.load_audio(mimii_sample / "fan_id00" / "normal" / "00000000.wav", "far")


# ----------------------------------------------------------------------------------------------
# Length policies


def test_fit_length():
    wave = np.arange(1, 11, dtype=np.float32)
    np.testing.assert_array_equal(data.fit_length(wave, 4), [1, 2, 3, 4])
    np.testing.assert_array_equal(data.fit_length(wave, 12), list(range(1, 11)) + [0, 0])
    stereo = np.stack([wave, -wave])
    assert data.fit_length(stereo, 12).shape == (2, 12)
    with pytest.raises(ValueError, match="positive integer"):
        data.fit_length(wave, 0)


def test_random_crop():
    wave = np.arange(100, dtype=np.float32)
    crop = data.random_crop(wave, 10, np.random.default_rng(3))
    np.testing.assert_array_equal(crop, np.arange(crop[0], crop[0] + 10))
    np.testing.assert_array_equal(crop, data.random_crop(wave, 10, np.random.default_rng(3)))
    starts = {data.random_crop(wave, 10, np.random.default_rng(s))[0] for s in range(20)}
    assert len(starts) > 1 and min(starts) >= 0 and max(starts) <= 90
    padded = data.random_crop(np.arange(1, 6, dtype=np.float32), 8, np.random.default_rng(0))
    np.testing.assert_array_equal(padded, [1, 2, 3, 4, 5, 0, 0, 0])
    stereo = np.stack([wave, wave + 1000])
    crop2 = data.random_crop(stereo, 10, np.random.default_rng(3))
    np.testing.assert_array_equal(crop2[1] - crop2[0], np.full(10, 1000))  # same window on both channels


def test_fixed_crop():
    wave = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(data.fixed_crop(wave, 4), [0, 1, 2, 3])
    np.testing.assert_array_equal(data.fixed_crop(wave, 4, offset="center"), [3, 4, 5, 6])
    np.testing.assert_array_equal(data.fixed_crop(wave, 4, offset=8), [8, 9, 0, 0])
    np.testing.assert_array_equal(data.fixed_crop(wave[:3], 5, offset="center"), [0, 1, 2, 0, 0])
    with pytest.raises(ValueError, match="past the end"):
        data.fixed_crop(wave, 4, offset=10)
    with pytest.raises(ValueError, match="'middle'"):
        data.fixed_crop(wave, 4, offset="middle")


def test_length_policy():
    wave = np.arange(32000, dtype=np.float32)  # 2 s
    rng = np.random.default_rng(0)
    assert data.LengthPolicy().apply(wave) is wave
    assert data.LengthPolicy("pad_or_cut", seconds=16).apply(wave).shape == (256000,)
    out, valid = data.LengthPolicy("pad_or_cut", seconds=16).apply_with_length(wave)
    assert valid == 32000 and out[valid:].max() == 0
    np.testing.assert_array_equal(data.LengthPolicy("pad_or_cut", seconds=1).apply(wave), wave[:16000])
    crop = data.LengthPolicy("random_crop", seconds=0.5).apply(wave, rng)
    assert crop.shape == (8000,) and crop[-1] - crop[0] == 7999
    np.testing.assert_array_equal(
        data.LengthPolicy("fixed_crop", seconds=1, offset=0.5).apply(wave), wave[8000:24000]
    )
    np.testing.assert_array_equal(
        data.LengthPolicy("fixed_crop", seconds=1, offset="center").apply(wave), wave[8000:24000]
    )
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        data.LengthPolicy("random_crop", seconds=1).apply(wave)
    with pytest.raises(ValueError, match="unknown length mode 'trim'"):
        data.LengthPolicy("trim", seconds=1)
    with pytest.raises(ValueError, match="needs seconds > 0"):
        data.LengthPolicy("pad_or_cut")
    with pytest.raises(ValueError, match="offset"):
        data.LengthPolicy("fixed_crop", seconds=1, offset=-1)


# ----------------------------------------------------------------------------------------------
# Lean reading: only the kept window is decoded, with the results of decoding the whole clip


def whole_file_crop(path, channel, policy, rng, sample_rate=SR):
    """The reference: decode everything with soundfile, pick the channel, resample, then cut."""
    stored, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = np.ascontiguousarray(stored.T if channel == "both" else stored[:, data.CHANNEL_INDEX[channel]])
    if rate != sample_rate:
        wave = data.audio_functional.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return policy.apply_with_length(wave, rng)


@pytest.fixture(scope="module")
def lean_clips(tmp_path_factory):
    """A 1-s stereo 16-bit clip (the official format), a 1-s stereo float clip, a 0.2-s stereo clip
    (shorter than the crops), a 1-s mono clip and a 0.5-s stereo clip at 44.1 kHz."""
    folder = tmp_path_factory.mktemp("lean")
    rng = np.random.default_rng(0)
    clips = {}
    for name, seconds, channels, rate, subtype in (
        ("pcm16", 1.0, 2, SR, "PCM_16"),
        ("float", 1.0, 2, SR, "FLOAT"),
        ("short", 0.2, 2, SR, "PCM_16"),
        ("mono", 1.0, 1, SR, "PCM_16"),
        ("resampled", 0.5, 2, 44100, "PCM_16"),
    ):
        n = round(seconds * rate)
        samples = rng.uniform(-0.5, 0.5, (n, channels) if channels == 2 else n).astype(np.float32)
        clips[name] = folder / f"{name}.wav"
        sf.write(clips[name], samples, rate, subtype=subtype)
    return clips


LEAN_POLICIES = [
    data.LengthPolicy("random_crop", seconds=0.25),
    data.LengthPolicy("random_crop", seconds=0.5),
    data.LengthPolicy("fixed_crop", seconds=0.25, offset=0.1),
    data.LengthPolicy("fixed_crop", seconds=0.25, offset="center"),
    data.LengthPolicy("pad_or_cut", seconds=0.5),
    data.LengthPolicy("pad_or_cut", seconds=1.5),
    data.LengthPolicy("none"),
]


@pytest.mark.parametrize("policy", LEAN_POLICIES, ids=lambda p: f"{p.mode}-{p.seconds}-{p.offset}")
@pytest.mark.parametrize(
    ("clip", "channel"),
    [
        ("pcm16", "near"),
        ("pcm16", "far"),
        ("pcm16", "both"),
        ("float", "far"),
        ("short", "near"),
        ("short", "both"),
        ("mono", "near"),
        ("resampled", "far"),
    ],
)
def test_read_clip_equals_whole_file_crop(lean_clips, clip, channel, policy):
    path = lean_clips[clip]
    for seed in range(4):
        new_rng, old_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        wave, valid = data.read_clip(path, channel, policy, new_rng)
        expected, expected_valid = whole_file_crop(path, channel, policy, old_rng)
        assert wave.dtype == np.float32 and wave.flags.c_contiguous
        np.testing.assert_array_equal(wave, expected)
        assert valid == expected_valid
        # The generator is left where the old path left it: the training items draw from it next.
        assert new_rng.integers(1 << 30) == old_rng.integers(1 << 30)


def test_read_clip_known_windows(lean_clips):
    stored, _ = sf.read(lean_clips["pcm16"], dtype="float32", always_2d=True)
    wave, valid = data.read_clip(
        lean_clips["pcm16"], "far", data.LengthPolicy("fixed_crop", 0.25, offset=0.5)
    )
    np.testing.assert_array_equal(wave, stored[8000:12000, 1])
    assert valid == 4000
    # A window running past the end: the audio that is there, then zeros; valid counts the audio.
    wave, valid = data.read_clip(
        lean_clips["pcm16"], "near", data.LengthPolicy("fixed_crop", 0.5, offset=0.75)
    )
    np.testing.assert_array_equal(wave[:4000], stored[12000:, 0])
    assert valid == 4000 and wave.shape == (8000,) and not wave[4000:].any()
    short, _ = sf.read(lean_clips["short"], dtype="float32", always_2d=True)
    wave, valid = data.read_clip(
        lean_clips["short"], "both", data.LengthPolicy("random_crop", 0.5), np.random.default_rng(0)
    )
    assert wave.shape == (2, 8000) and valid == 3200
    np.testing.assert_array_equal(wave[:, :3200], short.T)
    assert not wave[:, 3200:].any()


def test_read_clip_decodes_only_the_window(lean_clips, monkeypatch):
    reads = []
    original = sf.SoundFile.read

    def recording_read(handle, frames=-1, *args, **kwargs):
        reads.append((handle.tell(), frames))
        return original(handle, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", recording_read)
    rng = np.random.default_rng(5)
    start = int(np.random.default_rng(5).integers(0, 16000 - 4000 + 1))
    data.read_clip(lean_clips["pcm16"], "far", data.LengthPolicy("random_crop", 0.25), rng)
    assert reads == [(start, 4000)]
    reads.clear()
    data.read_clip(lean_clips["pcm16"], "near", data.LengthPolicy("pad_or_cut", 0.5))
    assert reads == [(0, 8000)]
    reads.clear()  # another rate: decoded whole, as the resampler needs
    data.read_clip(lean_clips["resampled"], "near", data.LengthPolicy("pad_or_cut", 0.25))
    assert reads == [(0, -1)]


def test_read_clip_bad_inputs(tmp_path, lean_clips):
    policy = data.LengthPolicy("random_crop", seconds=0.25)
    rng = np.random.default_rng(0)
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        data.read_clip(tmp_path / "absent.wav", "near", policy, rng)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(DatasetError, match="corrupt.wav"):
        data.read_clip(corrupt, "near", policy, rng)
    with pytest.raises(DatasetError, match=r"mono clip .*mono\.wav has no far channel"):
        data.read_clip(lean_clips["mono"], "far", policy, rng)
    with pytest.raises(ValueError, match="unknown channel 'left'"):
        data.read_clip(lean_clips["pcm16"], "left", policy, rng)
    with pytest.raises(ValueError, match="needs a numpy Generator"):
        data.read_clip(lean_clips["pcm16"], "near", policy)
    with pytest.raises(ValueError, match="offset 16000 is past the end of a 16000-sample clip"):
        data.read_clip(lean_clips["pcm16"], "near", data.LengthPolicy("fixed_crop", 0.25, offset=1.0))
    with pytest.raises(ValueError, match="counts samples at 16000 Hz but audio is loaded at 8000 Hz"):
        data.read_clip(lean_clips["pcm16"], "near", policy, rng, sample_rate=8000)
    quad = tmp_path / "quad.wav"
    sf.write(quad, np.zeros((100, 4), dtype=np.float32), SR, subtype="FLOAT")
    with pytest.raises(DatasetError, match="quad.wav has 4 channels"):
        data.read_clip(quad, "near", policy, rng)


def test_read_clip_checks_the_window_for_nan(tmp_path):
    samples = np.zeros((16000, 2), dtype=np.float32)
    samples[12000, 1] = np.nan  # the far channel, in the last quarter
    path = tmp_path / "nan.wav"
    sf.write(path, samples, SR, subtype="FLOAT")
    with pytest.raises(DatasetError, match="nan.wav holds NaN"):
        data.read_clip(path, "far", data.LengthPolicy("fixed_crop", 0.5, offset=0.5))
    with pytest.raises(DatasetError, match="nan.wav holds NaN"):
        data.read_clip(path, "both", data.LengthPolicy("pad_or_cut", 1.0))
    # Samples outside the window are never decoded, so they cannot reach the model.
    wave, _ = data.read_clip(path, "far", data.LengthPolicy("pad_or_cut", 0.5))
    assert np.isfinite(wave).all()
    wave, _ = data.read_clip(path, "near", data.LengthPolicy("fixed_crop", 0.5, offset=0.5))
    assert np.isfinite(wave).all()


def test_load_audio_window(lean_clips):
    stored, _ = sf.read(lean_clips["pcm16"], dtype="float32", always_2d=True)
    np.testing.assert_array_equal(
        data.load_audio(lean_clips["pcm16"], "far", start=100, frames=50), stored[100:150, 1]
    )
    np.testing.assert_array_equal(data.load_audio(lean_clips["pcm16"], "both", start=15990), stored[15990:].T)
    np.testing.assert_array_equal(
        data.load_audio(lean_clips["pcm16"], "near", start=15990, frames=100), stored[15990:, 0]
    )
    resampled = data.load_audio(lean_clips["resampled"], "near")
    assert resampled.shape == (8000,)
    np.testing.assert_array_equal(
        data.load_audio(lean_clips["resampled"], "near", start=1000, frames=300), resampled[1000:1300]
    )
    with pytest.raises(ValueError, match=r"start 16000 is past the end of .*pcm16\.wav: the clip has 16000"):
        data.load_audio(lean_clips["pcm16"], start=16000)
    with pytest.raises(ValueError, match=r"start 8000 is past the end .*after resampling from 44100 Hz"):
        data.load_audio(lean_clips["resampled"], start=8000)
    with pytest.raises(ValueError, match="start must be a non-negative"):
        data.load_audio(lean_clips["pcm16"], start=-1)
    with pytest.raises(ValueError, match="frames must be a positive"):
        data.load_audio(lean_clips["pcm16"], frames=0)


def test_length_policy_window():
    assert data.LengthPolicy().window(100) == (0, None)
    assert data.LengthPolicy("pad_or_cut", seconds=1).window(100) == (0, 16000)
    assert data.LengthPolicy("fixed_crop", seconds=0.5, offset="center").window(32000) == (12000, 8000)
    assert data.LengthPolicy("fixed_crop", seconds=0.5, offset=0.25).window(32000) == (4000, 8000)
    start, n = data.LengthPolicy("random_crop", seconds=0.5).window(32000, np.random.default_rng(1))
    assert n == 8000 and start == int(np.random.default_rng(1).integers(0, 24001))
    rng = np.random.default_rng(1)
    assert data.LengthPolicy("random_crop", seconds=1).window(8000, rng) == (0, 16000)
    assert rng.integers(1 << 30) == np.random.default_rng(1).integers(1 << 30)  # no draw for a short clip


# ----------------------------------------------------------------------------------------------
# Padding a batch


def test_pad_waves_stacks_and_zero_pads_to_the_longest():
    waves = [np.ones(3, dtype=np.float32), np.full(5, 2.0, dtype=np.float64)]
    batch = data.pad_waves(waves)
    assert batch.shape == (2, 5) and batch.dtype == torch.float32
    assert batch[0].tolist() == [1, 1, 1, 0, 0] and batch[1].tolist() == [2] * 5
    assert data.pad_waves([np.zeros(0)], min_length=1).shape == (1, 1)


# ----------------------------------------------------------------------------------------------
# Labels


def label_frame():
    return pd.DataFrame(
        {
            "machine": ["fan", "fan", "fan", "fan", "valve"],
            "section": ["00"] * 5,
            "attributes": ["spd_1", "spd_1", "spd_2", "spd_3", "noAttribute"],
            "domain": ["source", "target", "source", "source", "source"],
            "split": ["train", "train", "train", "test", "train"],
        }
    )


def test_section_and_attribute_labels():
    frame = label_frame()
    codes, classes = data.section_labels(frame)
    assert classes == ["fan|00", "valve|00"] and codes.tolist() == [0, 0, 0, 0, 1]
    codes, classes = data.attribute_labels(frame)
    assert classes == ["fan|00|spd_1", "fan|00|spd_2", "valve|00|noAttribute"]
    assert codes.tolist() == [0, 0, 1, -1, 2]  # spd_3 appears only in test rows


def test_composite_labels_distinguish_domain_and_channel():
    frame = label_frame()
    codes, classes = data.composite_labels(frame)
    assert codes[0] != codes[1]  # same attributes, source vs target
    assert "fan|00|spd_1|target" in classes and codes.dtype == np.int64
    items = data.expand_channels(frame, ("near", "far"))
    codes, classes = data.make_labels(items, "composite")
    assert len(classes) == 8 and codes[0] != codes[1]
    assert classes[codes[0]] == "fan|00|spd_1|source|near" and classes[codes[1]] == "fan|00|spd_1|source|far"
    assert items["row"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert codes[6] == codes[7] == -1


def test_make_labels_errors():
    with pytest.raises(ValueError, match="unknown label scheme 'machine'"):
        data.make_labels(label_frame(), "machine")
    with pytest.raises(DatasetError, match="no training rows"):
        data.make_labels(label_frame().assign(split="test"), "section")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['attributes'\]"):
        data.make_labels(label_frame().drop(columns="attributes"), "attribute")
    with pytest.raises(ValueError, match="already has a 'channel' column"):
        data.expand_channels(data.expand_channels(label_frame()), ("near",))


def test_usable_channels_on_mono_data_fail_or_fall_back_with_a_note(capsys):
    index = pd.DataFrame({"path": ["/d/a.wav", "/d/b.wav"], "channels": [2, 1]})
    stereo = index.assign(channels=2)
    assert data.usable_channels(["near", "far", "w1"], stereo) == ("near", "far", "w1")
    with pytest.raises(
        data.DatasetError, match=r"channel\(s\) \['far', 'w1'\] need the far microphone but /d/b.wav is mono"
    ):
        data.usable_channels(["near", "far", "w1"], index)
    assert data.usable_channels(["near", "far", "w1"], index, mono_fallback=True) == ("near",)
    assert "channels ['far', 'w1'] left out" in capsys.readouterr().out
    with pytest.raises(data.DatasetError, match="every channel"):
        data.usable_channels(["wl"], index, mono_fallback=True)
    with pytest.raises(ValueError, match="unknown channel 'left'"):
        data.usable_channels(["left"], stereo)
