"""Smoke tests of kit.tools.bench at tiny sizes: the measurements run and the tables print. Speed itself is
never asserted (it is what the benchmark commands are for)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import soundfile as sf
import torch

from kit import cli, data, denoise
from kit.tools import bench


def test_measure_speed_and_extraction_unit_size():
    row = bench.measure_speed("fisher", batch=2, seconds=1.0, repeats=1, device="cpu", config="unit")
    assert row["precision"] == "fp32" and row["config"] == "unit"
    assert row["clips_per_s"] > 0 and row["eager_clips_per_s"] > 0
    assert row["max_abs_diff"] < 1e-3  # the eager reference computes the same thing
    extraction = bench.measure_extraction("eat", batch=1, seconds=2.0, repeats=1, device="cpu", config="unit")
    assert extraction["extract_clips_per_s"] > 0 and extraction["extract_peak_mb"] > 0
    assert extraction["extract_precision"] == "fp32"
    args = argparse.Namespace(batch=2, seconds=1.0, extract_batch=1, extract_seconds=2.0)
    bench.print_backbones_table([row | extraction | {"peak_mb": 1.0, "eager_peak_mb": 2.0}], args)


def test_efficientat_rows_at_mn04_size():
    row = bench.measure_speed("efficientat", batch=2, seconds=1.0, repeats=1, device="cpu", config="mn04")
    assert row["config"] == "mn04" and round(row["params_m"], 2) == 0.98
    assert row["max_abs_diff"] == 0.0  # a CNN: the eager reference runs the same code
    extraction = bench.measure_extraction(
        "efficientat", batch=1, seconds=2.0, repeats=1, device="cpu", config="mn04"
    )
    assert extraction["extract_clips_per_s"] > 0
    assert bench.measure_memory("efficientat", "fast", 1, 1.0, "cpu", config="mn04") > 0


def test_release_sizes_come_from_the_backbone_modules():
    from kit.backbones import efficientat
    from kit.tools import bench_train

    assert bench_train.release_configs("efficientat") == ["mn04", "mn10"]
    assert [efficientat.RELEASES[r]["config"] for r in ("mn04_as", "mn10_as")] == ["mn04", "mn10"]
    assert [bench_train.release_configs(b) for b in ("beats", "eat", "fisher")] == [
        ["release"],
        ["base"],
        ["small"],
    ]
    assert bench_train.release_configs("cnn") == [None]  # trains from scratch: its own config


def test_eat_input_length_covers_the_extraction_clips():
    assert bench._input_options("eat", 16.0) == {"target_length": 1600}  # the EAT-ASP setting
    assert bench._input_options("eat", 10.0) == {"target_length": 1024}  # the release default
    assert bench._input_options("beats", 16.0) == {}


def test_backbones_refuses_fp16_on_cpu():
    with pytest.raises(ValueError, match="fp16 was asked for on the CPU"):
        bench.measure_extraction(
            "eat", batch=1, seconds=1.0, repeats=1, device="cpu", precision="fp16", config="unit"
        )


def test_loader_readers_agree(tmp_path):
    paths = bench.write_loader_clips(tmp_path, n_clips=2, seconds=1.0)
    info = sf.info(paths[0])
    assert (info.channels, info.samplerate, info.subtype, info.frames) == (2, 16000, "PCM_16", 16000)
    length = data.LengthPolicy("random_crop", seconds=0.25)
    whole = bench.CropItems(paths, length, "whole")
    lean = bench.CropItems(paths, length, "lean")
    assert len(whole) == 4 and whole.items[1] == (str(paths[0]), "far")
    for key in [(0, 1), (1, 2), (3, 3)]:
        assert torch.equal(whole[key], lean[key]) and whole[key].shape == (4000,)
    assert not torch.equal(whole[(0, 1)], whole[(1, 1)])  # near and far differ
    speed, first = bench.measure_loader(paths, length, "lean", batch=3, batches=2, workers=0)
    assert speed > 0 and first.shape == (3, 4000)
    with pytest.raises(ValueError, match="reader must be 'whole' or 'lean'"):
        bench.CropItems(paths, length, "mmap")


def test_loader_command_prints_its_table(capsys):
    code = bench.main(
        ["loader", "--clips", "2", "--clip-seconds", "1", "--crop-seconds", "0.25", "--batch", "2"]
        + ["--batches", "2", "--workers", "0", "--repeats", "1", "--threads", "1"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "whole file clips/s" in out and "waves equal: yes" in out
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "0" and float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")


def test_loader_batches_are_reproducible():
    first = bench.loader_batches(10, batch=4, n_batches=3, seed=1)
    assert first == bench.loader_batches(10, batch=4, n_batches=3, seed=1)
    assert len(first) == 3 and all(len(b) == 4 for b in first)
    assert all(0 <= i < 10 for b in first for i, _ in b)
    assert np.unique([s for b in first for _, s in b]).size == 12


def test_commands_are_registered():
    parser = bench.build_parser()
    args = parser.parse_args(["backbones", "--backbones", "eat", "--repeats", "1"])
    assert args.run is bench.run_backbones and args.backbones == ["eat"] and args.extract_seconds == 16.0
    assert parser.parse_args(["backbones"]).backbones == ["beats", "eat", "fisher", "efficientat", "nabeats"]
    assert parser.parse_args(["train"]).notebooks == ["05_finetune_efficientat"]
    assert parser.parse_args(["train", "--notebooks"]).notebooks == []
    assert parser.parse_args(["loader"]).workers == [0, 2]
    assert parser.parse_args(["train", "--steps", "3"]).steps == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["nosuchbench"])


def test_scoring_and_denoise_benchmarks_print_their_tables(capsys):
    assert cli.main(["bench-scoring", "--machines", "1", "--dims", "8", "--fusion-branches", "0"]) == 0
    out = capsys.readouterr().out
    assert "clips scored" in out and "mahalanobis" in out and "total:" in out
    # BEAM rows on per-band embeddings of 8 bands x dims and 4 x dims / 2
    assert "beam" in out and " 8 x 8 " in out and " 4 x 4 " in out and "peak MiB" in out
    assert cli.main(["bench-denoise", "--batch", "1", "--seconds", "0.5", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "ms/clip" in out and all(f" {method} " in out for method in denoise.CANCELLERS)
    assert cli.main(["bench-scoring", "--machines", "x"]) == 2  # argparse names the program
    assert "usage: dcase-kit bench-scoring" in capsys.readouterr().err


def test_training_settings_share_a_row_per_cost():
    from kit.tools import bench_train

    rows = bench_train.training_settings(["audiocc_1", "audiocc_3", "eat_asp_1", "eat_asp_2"])
    by_recipes = {tuple(r["recipes"]): r["training"] for r in rows}
    # AudioCC 1's BEATs and AudioCC 3's 10-s BEATs branches train the same way: one row
    shared = [s for s in by_recipes if "audiocc_1:beats_arcface" in s]
    assert len(shared) == 1 and any(name.startswith("audiocc_3:") for name in shared[0])
    assert all(r["training"]["backbone"] in ("beats", "eat") for r in rows)
    crops = {(r["training"]["backbone"], r["training"]["crop_seconds"]) for r in rows}
    assert ("beats", 6.0) in crops and ("eat", 16.0) in crops


def test_train_command_runs_real_steps(capsys):
    # the default recipe's from-scratch CNN is small enough to train at its real size on a CPU
    command = [
        "train",
        "--recipes",
        "default",
        "--notebooks",
        "--steps",
        "2",
        "--batch",
        "2",
        "--threads",
        "1",
    ]
    assert bench.main(command) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("cnn"))
    assert "default:cnn" in row and "fp32" in row and "batch replaced by 2" in out
    assert row.split()[1] == "cpu"  # the config column
    steps_per_s = float(row.split()[row.split().index("off") + 1])
    assert steps_per_s > 0


@pytest.mark.filterwarnings("ignore")  # random init: no pretrained weights, collapsed embeddings
def test_efficientat_training_setting_comes_from_notebook_05(tmp_path):
    from kit.tools import bench_train

    (setting,) = bench_train.training_settings([], ["05_finetune_efficientat"])
    assert setting["recipes"] == ["05:efficientat"] and setting["training"]["backbone"] == "efficientat"
    args = argparse.Namespace(
        steps=2, batch=2, workers=0, device="cpu", precision="auto", loader_batches=1, config="mn04"
    )
    root = bench_train.write_training_set(tmp_path, clips_per_class=1, seconds=5.0)
    row = bench_train.measure_training(setting["training"], args, root)
    assert row["backbone"] == "efficientat" and row["config"] == "mn04" and round(row["params_m"], 2) == 0.98
    assert row["steps_per_s"] > 0 and row["batch"] == 2
    with pytest.raises(ValueError, match="09_scoring is not a fine-tuning notebook"):
        bench_train.training_settings([], ["09_scoring"])


def test_train_command_names_an_unknown_recipe(capsys):
    assert bench.main(["train", "--recipes", "no_such_recipe", "--steps", "1"]) == 2
    assert "unknown recipe 'no_such_recipe'" in capsys.readouterr().err
