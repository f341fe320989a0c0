"""The command line: ./run_all.sh, `python -m kit.pipeline` and the `dcase-kit` command.

Notebooks are replaced by a recorder (running them is the end-to-end test's job in test_pipeline.py),
except for one cheap real run of notebook 01 on a tiny embedded dataset.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from kit import cli, pipeline

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = (
    "DATA_ROOT",
    "RUN_DIR",
    "BEATS_CHECKPOINT",
    "EAT_CHECKPOINT",
    "FISHER_CHECKPOINT",
    "TEAM_LABEL",
    "KIT_AUTHORS",
    "KIT_KERNEL",
    "PYTHON",
)


def run_all(*args, cwd=REPO, **env):
    """``bash run_all.sh ARGS`` with this interpreter and without the caller's DATA_ROOT / RUN_DIR."""
    environment = {k: v for k, v in os.environ.items() if k not in ("DATA_ROOT", "RUN_DIR", "KIT_KERNEL")}
    environment |= {"PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(REPO / "run_all.sh"), *args], cwd=cwd, env=environment, capture_output=True, text=True
    )


@pytest.fixture()
def executed(monkeypatch, tmp_path):
    """Record the notebooks the pipeline would run instead of running them; runs/ goes to tmp_path."""
    calls = []

    def record(source, target, parameters, kernel, log_output):
        calls.append({"notebook": source.stem, "target": target, "params": parameters, "kernel": kernel})

    monkeypatch.setattr(pipeline, "_execute_notebook", record)
    monkeypatch.setattr(pipeline, "REPO", tmp_path)  # the default run folder: tmp_path/runs/<recipe>-...
    for name in ("DATA_ROOT", "RUN_DIR", "KIT_KERNEL"):
        monkeypatch.delenv(name, raising=False)
    return calls


# --------------------------------------------------------------------------------------------------
# ./run_all.sh (a thin wrapper: every option is parsed by kit.pipeline)
# --------------------------------------------------------------------------------------------------


def test_run_all_help_documents_the_options_and_environment():
    result = run_all("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ./run_all.sh")
    for text in (*ENVIRONMENT, "--only", "--set", "--list", "--dry-run", "Smith_UNI_task2_N", "Repro_Kit"):
        assert text in result.stdout, text
    assert "./run_all.sh --only 01" in result.stdout  # examples


def test_run_all_lists_the_recipes():
    result = run_all("--list")
    assert result.returncode == 0, result.stderr
    for name in pipeline.recipe_names():
        assert name in result.stdout


def test_run_all_unknown_recipe_names_the_known_ones():
    result = run_all("nope", "--only", "01")
    assert result.returncode == 2
    assert (
        "unknown recipe 'nope'" in result.stderr
        and "audiocc_1" in result.stderr
        and "default" in result.stderr
    )


def test_run_all_options_without_a_recipe_and_before_or_after_it(tmp_path):
    result = run_all("--only", "01", "--dry-run")  # the default recipe; the run folder named after it
    assert result.returncode == 0, result.stderr
    assert f"{REPO}/runs/default-" in result.stdout and "01_data_preparation" in result.stdout
    assert "02_finetune_beats" not in result.stdout and "--only" not in result.stdout
    for args in (["--only", "01,02", "audiocc_1"], ["audiocc_1", "--only", "01,02"]):
        result = run_all(*args, "--dry-run", BEATS_CHECKPOINT="/ckpt/beats.pt")
        assert result.returncode == 0, result.stderr
        assert f"{REPO}/runs/audiocc_1-" in result.stdout
        assert "02_finetune_beats-beats_arcface" in result.stdout and "09_scoring" not in result.stdout
        assert "checkpoint: /ckpt/beats.pt" in result.stdout


def test_run_all_relative_paths_are_relative_to_where_it_is_typed(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_all("--only", "01", "--dry-run", cwd=tmp_path, DATA_ROOT="data", RUN_DIR="runs/mine")
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/runs/mine/notebooks/01_data_preparation.ipynb" in result.stdout
    assert f"data_root: {tmp_path}/data" in result.stdout
    result = run_all("--only", "01", cwd=tmp_path, DATA_ROOT="nothere")
    assert result.returncode == 2 and "data root nothere" in result.stderr


def test_run_all_sets_a_key_inside_a_mapping_parameter():
    notebook = next(nb.stem for nb in pipeline.notebook_paths() if nb.stem.startswith("07"))
    mapping = next(
        (k for k, v in pipeline.notebook_parameters(notebook).items() if isinstance(v, dict)), None
    )
    if mapping is None:
        pytest.skip(f"notebook {notebook} declares no mapping parameter")
    result = run_all("--only", "07", "--set", f"07.{mapping}.warmup_steps=5", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "warmup_steps: 5" in result.stdout
    # the notebook's other keys of that mapping stay (its CPU preset's lr, not TrainConfig's default)
    lr = pipeline.notebook_parameters(notebook)[mapping]["lr"]
    assert f"{mapping}.lr: {lr}" in result.stdout


def test_run_all_runs_notebook_01_for_real(tmp_path):
    """One cheap real papermill run: notebook 01 on a tiny embedded dataset."""
    result = run_all(
        "--only",
        "01",
        "--set",
        "01.embedded_scale=0.1",
        "--set",
        f"01.embedded_root={tmp_path / 'embedded'}",
        "--run-dir",
        str(tmp_path / "run"),
        OMP_NUM_THREADS="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run folder: {tmp_path / 'run'}" in result.stdout
    index = pd.read_csv(tmp_path / "run" / "index.csv")
    assert len(index) > 0 and set(index["split"]) == {"train", "test"}
    assert (tmp_path / "run" / "notebooks" / "01_data_preparation.ipynb").exists()
    assert not (tmp_path / "run" / "notebooks" / "02_finetune_beats.ipynb").exists()


# --------------------------------------------------------------------------------------------------
# kit.pipeline.main with the notebooks recorded
# --------------------------------------------------------------------------------------------------


def test_pipeline_main_defaults(executed, tmp_path, capsys):
    assert pipeline.main(["--only", "01", "--set", "01.embedded_scale=0.5"]) == 0
    (call,) = executed
    assert call["notebook"] == "01_data_preparation"
    assert call["params"]["data_root"] == "embedded" and call["params"]["embedded_scale"] == 0.5
    run_dir = call["target"].parents[1]
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("default-")
    assert f"run folder: {run_dir}" in capsys.readouterr().out


def test_pipeline_main_reads_the_environment(executed, tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KIT_KERNEL", "my-kernel")
    assert pipeline.main(["audiocc_1", "--only", "1,2"]) == 0
    assert [c["notebook"] for c in executed] == ["01_data_preparation", "02_finetune_beats"]
    assert {c["kernel"] for c in executed} == {"my-kernel"}
    assert {c["params"]["data_root"] for c in executed} == {str(tmp_path)}
    assert executed[1]["target"] == tmp_path / "run" / "notebooks" / "02_finetune_beats-beats_arcface.ipynb"
    # options beat the environment
    executed.clear()
    assert pipeline.main(["--only", "01", "--data-root", "embedded", "--run-dir", str(tmp_path / "r2")]) == 0
    assert executed[0]["params"]["data_root"] == "embedded"
    assert executed[0]["params"]["run_dir"] == str(tmp_path / "r2")


def test_pipeline_main_errors_run_nothing(executed, tmp_path, capsys):
    assert pipeline.main(["--only", "04"]) == 2
    assert "--only 04: not a notebook of recipe default" in capsys.readouterr().err
    assert pipeline.main(["--set", "07.no_such_parameter=1"]) == 2
    assert "has no parameter 'no_such_parameter'" in capsys.readouterr().err
    assert pipeline.main(["--data-root", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert executed == [] and not (tmp_path / "runs").exists()


def test_pipeline_main_reports_a_failed_notebook(monkeypatch, tmp_path, capsys):
    from papermill.exceptions import PapermillExecutionError

    def fail(*args):
        raise PapermillExecutionError(3, 1, "1/0", "ZeroDivisionError", "division by zero", [])

    monkeypatch.setattr(pipeline, "_execute_notebook", fail)
    assert pipeline.main(["--only", "01", "--run-dir", str(tmp_path / "run")]) == 1
    error = capsys.readouterr().err
    assert "ZeroDivisionError: division by zero" in error and str(tmp_path / "run" / "notebooks") in error


def test_dry_run_prints_the_plan_and_creates_nothing(executed, tmp_path, capsys):
    assert (
        pipeline.main(
            ["--only", "01", "--set", "01.embedded_seed=7", "--run-dir", str(tmp_path / "r"), "--dry-run"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"01_data_preparation -> {tmp_path / 'r' / 'notebooks' / '01_data_preparation.ipynb'}" in out
    assert "embedded_seed: 7" in out
    assert executed == [] and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# dcase-kit
# --------------------------------------------------------------------------------------------------


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in cli.COMMANDS.items():
        assert f"  {name} " in out and command.summary in out
    assert cli.main([]) == 2  # no command: the same help, and a usage exit code
    assert "commands:" in capsys.readouterr().out


def test_unknown_command_suggests_a_close_one(capsys):
    assert cli.main(["metrcs", "x"]) == 2
    error = capsys.readouterr().err
    assert "unknown command 'metrcs'" in error and "did you mean 'metrics'?" in error


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help_with_an_example(name, capsys):
    if importlib.util.find_spec(cli.COMMANDS[name].module) is None:
        pytest.skip(f"{cli.COMMANDS[name].module} is not in this checkout")
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "examples:" in out
    assert f"dcase-kit {name}" in out.split("examples:")[1]


def test_a_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "mix", cli.Command("kit.no_such_module", "test"))
    assert cli.main(["mix", "--help"]) == 2
    assert "`dcase-kit mix` needs kit.no_such_module (kit/no_such_module.py)" in capsys.readouterr().err


def test_a_missing_package_is_named(monkeypatch, tmp_path, capsys):
    (tmp_path / "needs_a_package.py").write_text("import no_such_package_for_the_kit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "needy", cli.Command("needs_a_package", "test"))
    assert cli.main(["needy"]) == 2
    error = capsys.readouterr().err
    assert "'no_such_package_for_the_kit'" in error and "pip install -r requirements.txt" in error


def test_commands_hand_their_arguments_to_the_module(monkeypatch):
    seen = {}

    def with_prog(argv, prog="python -m x"):
        seen["with_prog"] = (argv, prog)
        return 3

    def usage_error(argv=None, prog="python -m x"):
        raise SystemExit(2)

    for name, main in (("a", with_prog), ("c", usage_error)):
        monkeypatch.setitem(sys.modules, f"fake_{name}", types.SimpleNamespace(main=main))
        monkeypatch.setitem(cli.COMMANDS, name, cli.Command(f"fake_{name}", "test"))
    monkeypatch.setitem(cli.COMMANDS, "d", cli.Command("fake_a", "test", prefix=("sub",)))
    saved_argv = list(sys.argv)
    assert cli.main(["a", "x", "--y"]) == 3
    assert cli.main(["c", "--z", "1"]) == 2
    assert seen == {"with_prog": (["x", "--y"], "dcase-kit a")}
    assert cli.main(["d", "x"]) == 3
    assert seen["with_prog"] == (["sub", "x"], "dcase-kit")
    assert sys.argv == saved_argv  # the arguments go to main, never through sys.argv


def test_every_command_module_takes_argv_and_prog():
    for command in cli.COMMANDS.values():
        if importlib.util.find_spec(command.module) is None:
            continue
        parameters = inspect.signature(importlib.import_module(command.module).main).parameters
        assert {"argv", "prog"} <= set(parameters), command.module


def test_run_and_list_are_the_pipeline(executed, tmp_path, capsys):
    assert cli.main(["run", "audiocc_1", "--only", "01", "--run-dir", str(tmp_path / "run")]) == 0
    assert [c["notebook"] for c in executed] == ["01_data_preparation"]
    capsys.readouterr()
    assert cli.main(["list", "--names"]) == 0
    assert capsys.readouterr().out.split() == pipeline.recipe_names()


def test_metrics_validate_and_zip_delegate(tmp_path, capsys):
    folder = tmp_path / "dev"
    folder.mkdir()
    names = [
        f"section_00_{d}_test_{lab}_{i:04d}_noAttribute.wav"
        for i, (d, lab) in enumerate(
            [("source", "normal"), ("source", "anomaly"), ("target", "normal"), ("target", "anomaly")]
        )
    ]
    scores = [0.1, 0.9, 0.2, 0.8]
    (folder / "anomaly_score_fan_section_00_test.csv").write_text(
        "".join(f"{n},{s}\n" for n, s in zip(names, scores))
    )
    assert cli.main(["metrics", str(folder)]) == 0
    assert "official score (dev): 1.0" in capsys.readouterr().out
    assert cli.main(["validate", str(tmp_path / "missing")]) in (1, 2)
    assert "missing" in capsys.readouterr().err
    assert cli.main(["zip", "--help"]) == 0
    assert "submission_dir" in capsys.readouterr().out


def test_package_metadata_installs_the_command():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"dcase-kit": "kit.cli:main"}
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    for name, command in cli.COMMANDS.items():
        if name != "mix":  # kit.mix may come later than the command
            assert importlib.util.find_spec(command.module) is not None, command.module


def test_the_installed_command_runs():
    script = shutil.which(
        "dcase-kit", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if script is None:
        pytest.skip("dcase-kit is not installed in this environment (pip install -e . installs it)")
    result = subprocess.run([script, "list", "--names"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "default" in result.stdout.split()
    result = subprocess.run([script, "run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: dcase-kit run")


def test_checkpoints_lists_every_backbones_releases_and_how_to_get_them(capsys):
    assert cli.main(["checkpoints"]) == 0
    out = capsys.readouterr().out
    for name in (
        "BEATs_iter3_plus_AS2M",
        "EAT-base_epoch30_pretrain",
        "FISHER-small-0723",
        "mn04_as",
        "dcase2026_nabeats_seed0",
    ):
        assert f"\n  {name}\n" in out
    assert "OneDrive share page" in out and "dcase-kit checkpoints fetch FISHER-small-0723 DIR" in out
    assert cli.main(["checkpoints", "--backbone", "cnn"]) == 2
    assert "no releases of backbone 'cnn'" in capsys.readouterr().err
