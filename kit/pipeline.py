"""Run the numbered notebooks in order with papermill, for one named system or the embedded default.

A *system* is a YAML file in ``notebooks/systems/``: an ordered list of steps, each a notebook and
its papermill parameters (``${VAR}`` and ``${VAR:-default}`` expand from the environment, so checkpoint paths can
come from variables such as ``BEATS_CHECKPOINT``; an empty value means "none"). Every notebook also
gets ``data_root`` and ``run_dir``, so all stages read from and write to one run folder.

    python -m kit.pipeline [SYSTEM] --data-root embedded --run-dir runs/x
    python -m kit.pipeline --list
    python -m kit.pipeline default --set 02_finetune_beats.steps=50 --only 01,02

Executed notebooks are saved beside the run's outputs (``<run_dir>/notebooks/``), so a run folder
documents itself. ``sweep`` runs one notebook over a grid of parameters, each combination in its
own run folder (see the README).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
SYSTEMS = NOTEBOOKS / "systems"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def system_names() -> list[str]:
    return sorted(p.stem for p in SYSTEMS.glob("*.yaml"))


def _expand(value):
    if isinstance(value, str):
        expanded = _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
        if value != expanded and expanded == "":
            return None  # an unset checkpoint variable means "no checkpoint"
        return expanded
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_system(name_or_path: str) -> dict:
    """The system's YAML with environment variables expanded:
    ``{name, description, steps: [{notebook, params}, ...]}`` (a notebook may appear several times,
    e.g. one fine-tuning run per BEATs variant of a fusion system)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SYSTEMS / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"unknown system {name_or_path!r}: no {path}; known: {', '.join(system_names())}"
        )
    spec = yaml.safe_load(path.read_text()) or {}
    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{path}: expected a 'steps' list of {{notebook: NAME, params: {{...}}}}")
    known = {p.stem for p in notebook_paths()}
    for step in steps:
        if not isinstance(step, dict) or step.get("notebook") not in known:
            raise ValueError(f"{path}: step {step!r} does not name a notebook; notebooks are {sorted(known)}")
    steps = [{"notebook": s["notebook"], "params": _expand(dict(s.get("params") or {}))} for s in steps]
    return {"name": path.stem, "description": spec.get("description", ""), "steps": steps}


def _parse_override(text: str):
    key, _, value = text.partition("=")
    notebook, _, param = key.partition(".")
    if not param:
        raise ValueError(f"--set expects NOTEBOOK.PARAM=VALUE, got {text!r}")
    return notebook, param, yaml.safe_load(value)


def run_system(
    system: str,
    data_root: str,
    run_dir: str | os.PathLike,
    *,
    overrides: list[str] = (),
    only: list[str] | None = None,
    kernel: str | None = None,
    log_output: bool = False,
) -> Path:
    """Execute the system's steps in order; returns the run folder. ``overrides`` (``NB.PARAM=VALUE``)
    apply to every step of that notebook; ``only`` keeps the steps whose notebook number/name is listed."""
    import papermill as pm

    spec = load_system(system)
    run_dir = Path(run_dir).resolve()
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    steps = spec["steps"]
    for text in overrides:
        notebook, param, value = _parse_override(text)
        matching = [s for s in steps if s["notebook"] == notebook or s["notebook"][:2] == notebook]
        if not matching:
            raise ValueError(f"--set {text!r}: notebook {notebook!r} is not part of system {spec['name']}")
        for step in matching:
            step["params"][param] = value
    for step in steps:
        notebook = step["notebook"]
        if only and notebook[:2] not in only and notebook not in only:
            continue
        values = {"data_root": str(data_root), "run_dir": str(run_dir), **step["params"]}
        suffix = f"-{values['name']}" if "name" in values else ""
        target = run_dir / "notebooks" / f"{notebook}{suffix}.ipynb"
        start = time.time()
        print(f"[{spec['name']}] {notebook}{suffix} ...", flush=True)
        pm.execute_notebook(
            str(NOTEBOOKS / f"{notebook}.ipynb"),
            str(target),
            parameters=values,
            kernel_name=kernel,
            cwd=str(REPO),
            log_output=log_output,
            progress_bar=False,
        )
        print(f"[{spec['name']}] {notebook}{suffix} done in {time.time() - start:.0f} s", flush=True)
    return run_dir


def _link_tree(source: Path, target: Path) -> None:
    """Mirror ``source`` into ``target`` with hard links (no copy of the data). Safe because every
    stage writes its outputs atomically (a new file replaces the link; the source stays intact)."""
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if rel.parts[0] == "notebooks" or path.is_dir():
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            try:
                os.link(path, dest)
            except OSError:  # another file system: fall back to a copy
                shutil.copy2(path, dest)


def sweep(
    notebook: str,
    grid: dict[str, list],
    run_dir: str | os.PathLike,
    run_root: str | os.PathLike,
    params: dict | None = None,
    kernel: str | None = None,
) -> list[Path]:
    """Run one notebook for every combination of ``grid``. Each combination gets its own run folder
    ``<run_root>/<param=value,...>`` that starts as a hard-linked mirror of ``run_dir`` (the inputs
    the notebook reads), so the runs never overwrite each other or the original run."""
    import papermill as pm

    path = NOTEBOOKS / f"{notebook}.ipynb"
    if not path.exists():
        raise FileNotFoundError(f"no notebook {path}")
    source = Path(run_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"run folder {source} not found: run the earlier notebooks first")
    keys = sorted(grid)
    outputs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        tag = ",".join(f"{k}={v}" for k, v in zip(keys, combo))
        out = (Path(run_root) / tag).resolve()
        _link_tree(source, out)
        (out / "notebooks").mkdir(parents=True, exist_ok=True)
        values = {**(params or {}), **dict(zip(keys, combo)), "run_dir": str(out)}
        print(f"[sweep] {notebook} {tag}", flush=True)
        pm.execute_notebook(
            str(path),
            str(out / "notebooks" / path.name),
            parameters=values,
            kernel_name=kernel,
            cwd=str(REPO),
            progress_bar=False,
        )
        outputs.append(out)
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "system", nargs="?", default="default", help="system name in notebooks/systems/ or a YAML path"
    )
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "embedded"))
    parser.add_argument("--run-dir", default=os.environ.get("RUN_DIR"))
    parser.add_argument("--set", action="append", default=[], metavar="NOTEBOOK.PARAM=VALUE")
    parser.add_argument("--only", default=None, help="comma-separated notebook numbers or names to run")
    parser.add_argument("--kernel", default=os.environ.get("KIT_KERNEL"))
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name in system_names():
            print(f"{name:16s} {load_system(name)['description']}")
        return 0
    run_dir = args.run_dir or str(
        REPO / "runs" / f"{Path(args.system).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        run_system(
            args.system,
            args.data_root,
            run_dir,
            overrides=args.set,
            only=args.only.split(",") if args.only else None,
            kernel=args.kernel,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
