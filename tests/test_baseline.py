"""The official autoencoder baseline: features, network, and a tiny end-to-end run on written WAVs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torchaudio
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.metrics import roc_auc_score

from kit import baseline

RATE = baseline.SAMPLE_RATE


def tone(frequency: float, seconds: float, seed: int, noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (
        0.3 * np.sin(2 * np.pi * frequency * t + rng.uniform(0, 6)) + noise * rng.normal(size=t.size)
    ).astype(np.float32)


def test_log_mel_is_the_slaney_power_spectrogram_in_decibels():
    wave = tone(1000.0, 1.0, seed=0)
    log_mel = baseline.LogMel()(torch.from_numpy(wave))
    assert log_mel.shape == (128, 1 + len(wave) // baseline.HOP_LENGTH)
    # The same numbers by hand: centred zero-padded frames, periodic Hann, |FFT|^2, Slaney mel, 10 log10.
    padded = np.pad(wave.astype(np.float64), baseline.N_FFT // 2)
    starts = np.arange(log_mel.shape[1]) * baseline.HOP_LENGTH
    frames = padded[starts[:, None] + np.arange(baseline.N_FFT)]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(baseline.N_FFT) / baseline.N_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    filters = torchaudio.functional.melscale_fbanks(
        513, 0.0, RATE / 2, 128, RATE, norm="slaney", mel_scale="slaney"
    )
    expected = 10 * np.log10(np.maximum(power @ filters.double().numpy(), np.finfo(float).eps)).T
    np.testing.assert_allclose(log_mel.numpy(), expected, atol=1e-3)
    # Slaney scale: 200/3 Hz per mel up to 1 kHz (15 mel), 8 kHz = 15 + 27 ln 8 / ln 6.4 = 45.25 mel; band b is
    # centred on (b + 1) 45.25 / 129 mel, so 1 kHz peaks in band 42 (the HTK scale would put it in band 44).
    assert int(log_mel[:, 10].argmax()) == 42


def test_stack_frames_concatenates_five_consecutive_frames():
    log_mel = torch.arange(4 * 9, dtype=torch.float32).reshape(4, 9)  # 4 bands, 9 frames
    vectors = baseline.stack_frames(log_mel, n_frames=5)
    assert vectors.shape == (5, 20)
    for t in range(5):
        np.testing.assert_array_equal(vectors[t].numpy(), log_mel[:, t : t + 5].T.reshape(-1).numpy())
    assert baseline.stack_frames(torch.zeros(128, 313)).shape == (309, 640)
    with pytest.raises(ValueError, match="shorter"):
        baseline.stack_frames(torch.zeros(128, 4))


def test_network_layer_sizes():
    model = baseline.BaselineAutoencoder()
    linear = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [
        (640, 128),
        (128, 128),
        (128, 128),
        (128, 128),
        (128, 8),
        (8, 128),
        (128, 128),
        (128, 128),
        (128, 128),
        (128, 640),
    ]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 9 and all(n.momentum == 0.01 and n.eps == 1e-3 for n in norms)
    assert model.eval()(torch.zeros(3, 640)).shape == (3, 640)


def test_mahala_takes_the_smaller_domain_score():
    rng = np.random.default_rng(1)
    residuals = rng.normal(size=(6, 128))
    precisions = {"source": np.eye(128), "target": np.diag(np.r_[np.full(64, 0.1), np.full(64, 10.0)])}
    residuals[:3, 64:] *= 0.01  # small where the target is strict: the target score is the smaller one
    residuals[3:, :64] *= 0.01  # small where the target is lax... and large where it is strict: source wins
    expected_source = [scipy_mahalanobis(r, np.zeros(128), precisions["source"]) ** 2 for r in residuals]
    expected_target = [scipy_mahalanobis(r, np.zeros(128), precisions["target"]) ** 2 for r in residuals]
    scores = baseline.mahala_scores(residuals, precisions)
    np.testing.assert_allclose(scores, np.minimum(expected_source, expected_target))
    assert (np.array(expected_target[:3]) < expected_source[:3]).all()
    assert (np.array(expected_source[3:]) < expected_target[3:]).all()


def test_streamed_residual_covariance_equals_the_batch_one():
    rng = np.random.default_rng(2)
    blocks = rng.normal(size=(600, 128)) @ rng.normal(size=(128, 128)) * 0.1 + 3.0
    moments = baseline._ResidualMoments()
    for chunk in np.array_split(blocks, 7):
        moments.add("source", chunk)
    precisions = moments.precisions("toy")
    np.testing.assert_allclose(precisions["source"], np.linalg.inv(np.cov(blocks, rowvar=False)), rtol=1e-6)
    assert precisions["target"] is precisions["source"]  # no target clips: the source covariance serves both
    moments.add("target", blocks[:100])
    with pytest.raises(ValueError, match="100 target residual blocks"):
        moments.precisions("toy")


def write_clip(path, near: np.ndarray, far: np.ndarray | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, near if far is None else np.stack([near, far], axis=1), RATE)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Stereo clips: near = a 1 kHz tone (target: 1.2 kHz) + noise; anomalies = a 3 kHz tone. The far
    channel carries the anomaly tone for normal clips, so reading the wrong channel would fail."""
    root = tmp_path_factory.mktemp("tiny") / "dev_data" / "raw" / "toy"
    rows, seed = [], 0
    clips = [("train", "source", "normal", 1000.0, i) for i in range(12)]
    clips += [("train", "target", "normal", 1200.0, i) for i in range(4)]
    clips += [("test", "source", "normal", 1000.0, i) for i in range(6)]
    clips += [("test", "source", "anomaly", 3000.0, i) for i in range(6)]
    for split, domain, label, frequency, number in clips:
        seed += 1
        name = f"section_00_{domain}_{split}_{label}_{number:04d}_noAttribute.wav"
        far = tone(3000.0 if label == "normal" else 1000.0, 1.0, seed=seed + 1000)
        write_clip(root / split / name, tone(frequency, 1.0, seed=seed), far)
        rows.append(
            {
                "path": str(root / split / name),
                "file_name": name,
                "dataset": "dev",
                "machine": "toy",
                "section": "00",
                "split": split,
                "domain": domain,
                "label": label,
                "attributes": "noAttribute",
                "duration": 1.0,
                "channels": 2,
                "sample_rate": RATE,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    path = baseline.train_baseline(
        tiny_dataset, run_dir, "toy", epochs=8, batch_size=16, learning_rate=3e-3, progress=False
    )
    return run_dir, path


def test_training_writes_the_model_and_its_history(trained):
    run_dir, path = trained
    assert path == baseline.model_path(run_dir, "toy") and path.is_file()
    history = pd.read_csv(path.with_name("toy_history.csv"))
    assert list(history.columns) == ["epoch", "train_loss", "val_loss"] and len(history) == 8
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    _, precisions, checkpoint = baseline.load_baseline(path)
    assert checkpoint["settings"]["n_clips"] == 16
    assert precisions["source"].shape == (128, 128) and not np.allclose(
        precisions["source"], precisions["target"]
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.pt", "toy_history.csv"]


@pytest.mark.parametrize("method", baseline.METHODS)
def test_anomalies_score_higher(tiny_dataset, trained, method):
    run_dir, _ = trained
    scores = baseline.score_baseline(tiny_dataset, run_dir, "toy", method, progress=False)
    assert list(scores.columns) == baseline.SCORE_COLUMNS and len(scores) == len(tiny_dataset)
    assert (scores["channel"] == "near").all() and np.isfinite(scores["score"]).all()
    test = scores[scores["split"] == "test"]
    assert roc_auc_score(test["label"] == "anomaly", test["score"]) > 0.8
    only_test = baseline.score_baseline(
        tiny_dataset, run_dir, "toy", method, include_train=False, progress=False
    )
    np.testing.assert_allclose(only_test["score"], test["score"], rtol=1e-6)


def test_mono_clips_are_their_own_near_channel(tmp_path):
    wave = tone(1000.0, 0.5, seed=7)
    write_clip(tmp_path / "mono.wav", wave, None)
    write_clip(tmp_path / "stereo.wav", wave, tone(500.0, 0.5, seed=8))
    front_end = baseline.LogMel()
    np.testing.assert_allclose(
        baseline._clip_log_mel(tmp_path / "mono.wav", front_end),
        baseline._clip_log_mel(tmp_path / "stereo.wav", front_end),
        atol=1e-4,
    )


def test_bad_input_raises_clear_errors(tiny_dataset, trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(ValueError, match="no train clips of machine 'fan'"):
        baseline.train_baseline(tiny_dataset, tmp_path, "fan", epochs=1, progress=False)
    with pytest.raises(ValueError, match="method"):
        baseline.score_baseline(tiny_dataset, run_dir, "toy", "L2", progress=False)
    with pytest.raises(FileNotFoundError, match="train_baseline first"):
        baseline.score_baseline(tiny_dataset, tmp_path, "toy", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        baseline.train_baseline(tiny_dataset, tmp_path, "toy", epochs=0, progress=False)
    with pytest.raises(ValueError, match="22050 Hz"):
        baseline.train_baseline(
            tiny_dataset.assign(sample_rate=22050), tmp_path, "toy", epochs=1, progress=False
        )
    missing = tiny_dataset.assign(path=tiny_dataset["path"].str.replace("toy", "gone"))
    with pytest.raises(FileNotFoundError, match="gone"):
        baseline.train_baseline(missing, tmp_path, "toy", epochs=1, progress=False)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="corrupt.wav"):
        baseline.train_baseline(
            tiny_dataset.assign(path=str(corrupt)), tmp_path, "toy", epochs=1, progress=False
        )
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "toy.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable baseline checkpoint"):
        baseline.score_baseline(tiny_dataset, tmp_path, "toy", progress=False)


def test_the_baseline_runs_on_a_canceller_channel_under_its_own_name(tiny_dataset, tmp_path):
    """channels=("near", "w1"): one model per machine and channel, systems baseline-MSE and
    baseline-MSE-w1; the w1 model reads the cancelled clip; an epoch count change retrains."""
    systems = baseline.run_baseline(tiny_dataset, tmp_path, epochs=1, channels=("near", "w1"), progress=False)
    assert sorted(systems) == ["baseline-MAHALA", "baseline-MAHALA-w1", "baseline-MSE", "baseline-MSE-w1"]
    assert (systems["baseline-MSE-w1"]["channel"] == "w1").all()
    assert not np.allclose(systems["baseline-MSE"]["score"], systems["baseline-MSE-w1"]["score"])
    path = baseline.model_path(tmp_path, "toy", "w1")
    assert path.name == "toy-w1.pt" and baseline.load_baseline(path)[2]["settings"]["channel"] == "w1"
    baseline.run_baseline(
        tiny_dataset, tmp_path, epochs=2, channels=("w1",), methods=("MSE",), progress=False
    )
    assert baseline.load_baseline(path)[2]["settings"]["epochs"] == 2
    with pytest.raises(ValueError, match="unknown channel 'w7'"):
        baseline.run_baseline(tiny_dataset, tmp_path, epochs=1, channels=("w7",), progress=False)
