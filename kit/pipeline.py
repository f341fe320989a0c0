"""Run the numbered notebooks in order with papermill, for one named recipe or the embedded default.

A *recipe* is a YAML file in ``notebooks/recipes/``: an ordered list of steps, each a notebook and
its papermill parameters (``${VAR}`` and ``${VAR:-default}`` expand from the environment, so checkpoint paths can
come from variables such as ``BEATS_CHECKPOINT``; an empty value means "none"). Every notebook also
gets ``data_root`` and ``run_dir``, so all stages read from and write to one run folder.

    python -m kit.pipeline [RECIPE] --data-root embedded --run-dir runs/x
    python -m kit.pipeline --list
    python -m kit.pipeline default --set 02.training.steps=50 --set 02.training.lr=1e-4 --only 01,02

``--set NOTEBOOK.PARAM=VALUE`` replaces a parameter of every step of that notebook;
``--set NOTEBOOK.PARAM.KEY=VALUE`` (any depth) sets one key inside a mapping parameter and keeps
its other keys (the recipe's, or the notebook's default where the recipe sets none). A parameter
the notebook does not declare is an error, so a typo never runs unnoticed. Values parse as YAML
(``50``, ``1e-4``, ``[near]``, ``null``).

Executed notebooks are saved beside the run's outputs (``<run_dir>/notebooks/``), so a run folder
documents itself. ``sweep`` runs one notebook over a grid of parameters, each combination in its
own run folder (see the README).
"""

from __future__ import annotations

import argparse
import ast
import copy
import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RECIPES = NOTEBOOKS / "recipes"
EMBEDDED = "embedded"
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-4`` as a number, as YAML 1.2 does (PyYAML's YAML 1.1 makes it a
    string, which a learning rate must not silently become). For recipes and --set values."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)

# What ``--help`` says about the environment (run_all.sh and ``dcase-kit run`` read the same variables).
ENVIRONMENT_HELP = """\
environment variables:
  DATA_ROOT          dataset root in the official layout (<root>/dev_data/raw/<machine>/...);
                     default "embedded": the generated dataset in data/embedded (same as --data-root)
  RUN_DIR            run folder; default a new folder runs/<recipe>-<date>-<time> (same as --run-dir)
  BEATS_CHECKPOINT   pre-trained checkpoints the recipes use: a local path, a Hugging Face
  EAT_CHECKPOINT     repo id (e.g. worstchan/EAT-base_epoch30_pretrain) or a URL; the report
  FISHER_CHECKPOINT  recipes refuse to run without theirs
  EFFICIENTAT_CHECKPOINT  the default's pretrained model: an EfficientAT release name (default
                     mn04_as: 4 MB, downloaded once into KIT_CACHE) or its .pt file (offline machines)
  NABEATS_CHECKPOINT the NA-BEATs recipes' .ckpt: a release name (dcase2026_nabeats_seed0, _seed1,
                     _seed2: downloaded from MERL's GitHub release), a local path or a URL
  NABEATS_BASE       its base BEATs_iter3.pt; unset: beside the checkpoint, in the cache, or downloaded
  TEAM_LABEL         submission label prefix: Smith_UNI gives Smith_UNI_task2_N (default Repro_Kit)
  KIT_AUTHORS        YAML file with the submission's authors (written into <label>.meta.yaml)
  KIT_KERNEL         Jupyter kernel the notebooks run in (same as --kernel; default: the notebooks' own)
  KIT_CACHE          where downloaded checkpoints are kept (default ~/.cache/dcase2026-kit)
  PYTHON             interpreter run_all.sh uses (default .venv/bin/python, else python3)
"""


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _substitute(text: str) -> str:
    return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), text)


def _expand(value):
    if isinstance(value, str):
        expanded = _substitute(value)
        if value != expanded and expanded == "":
            return None  # an unset checkpoint variable means "no checkpoint"
        return expanded
    if isinstance(value, dict):  # keys too: submission labels are keys ("${TEAM_LABEL:-Repro_Kit}_task2_1")
        return {(_substitute(k) if isinstance(k, str) else k): _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_recipe(name_or_path: str) -> dict:
    """The recipe's YAML with environment variables expanded:
    ``{name, description, steps: [{notebook, params}, ...]}`` (a notebook may appear several times,
    e.g. one fine-tuning run per BEATs variant of a fusion recipe)."""
    if not NOTEBOOKS.is_dir():
        raise FileNotFoundError(
            f"no notebooks folder at {NOTEBOOKS}: the pipeline runs from a checkout of the repository "
            "(install it with `pip install -e .` from the checkout, not `pip install .`)"
        )
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"unknown recipe {name_or_path!r}: no {path}; known: {', '.join(recipe_names())}"
        )
    spec = yaml.load(path.read_text(), Loader=_Loader) or {}
    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{path}: expected a 'steps' list of {{notebook: NAME, params: {{...}}}}")
    known = {p.stem for p in notebook_paths()}
    for step in steps:
        if not isinstance(step, dict) or step.get("notebook") not in known:
            raise ValueError(f"{path}: step {step!r} does not name a notebook; notebooks are {sorted(known)}")
    steps = [{"notebook": s["notebook"], "params": _expand(dict(s.get("params") or {}))} for s in steps]
    return {"name": path.stem, "description": spec.get("description", ""), "steps": steps}


def describe_recipes() -> str:
    """One line per recipe: its name and description (what ``--list`` prints)."""
    return "\n".join(f"{name:16s} {load_recipe(name)['description']}" for name in recipe_names())


def _notebook_key(text: str) -> str:
    """``2`` -> ``02``; a notebook number or name otherwise as given."""
    return text.zfill(2) if text.isdigit() else text


def _is_notebook(step: dict, key: str) -> bool:
    return step["notebook"] == key or step["notebook"][:2] == key


def _parse_override(text: str) -> tuple[str, list[str], object]:
    """``02.training.steps=50`` -> (``"02"``, ``["training", "steps"]``, ``50``); the value parses as YAML."""
    key, equals, value = text.partition("=")
    notebook, _, param = key.partition(".")
    path = param.split(".") if param else []
    if not equals or not notebook or not path or "" in path:
        raise ValueError(
            f"--set expects NOTEBOOK.PARAM=VALUE or NOTEBOOK.PARAM.KEY=VALUE (e.g. 02.seed=1, "
            f"02.training.steps=50), got {text!r}"
        )
    try:
        parsed = yaml.load(value, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(f"--set {text!r}: the value {value!r} is not valid YAML ({error})") from error
    return _notebook_key(notebook), path, parsed


def notebook_parameters(notebook: str) -> dict:
    """The parameters a notebook declares in its ``parameters`` cell: ``{name: default}``, the
    default being the literal value (``None`` where it is an expression, not a literal)."""
    path = NOTEBOOKS / f"{notebook}.ipynb"
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a readable notebook ({error})") from error
    sources = ["".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not sources:
        raise ValueError(f"{path}: no cell tagged 'parameters' (papermill needs one)")
    defaults = {}
    for node in ast.parse(sources[0]).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                value = None
            defaults |= {target.id: value for target in targets if isinstance(target, ast.Name)}
    return defaults


def _set_nested(params: dict, path: list[str], value, where: str) -> None:
    """Set ``params[path[0]][path[1]]... = value``, creating mappings on the way."""
    target = params
    for depth, key in enumerate(path[:-1]):
        inner = target.get(key)
        if inner is None:
            inner = target[key] = {}
        elif not isinstance(inner, dict):
            dotted = ".".join(path[: depth + 1])
            raise ValueError(
                f"{where}: parameter {dotted} is {inner!r}, not a mapping, so it has no keys to set"
            )
        target = inner
    target[path[-1]] = value


def apply_overrides(spec: dict, overrides: list[str]) -> dict:
    """A copy of the loaded recipe ``spec`` with the ``--set`` overrides applied to every step of
    the notebook they name (``02`` or ``02_finetune_beats``)."""
    spec = copy.deepcopy(spec)
    for text in overrides:
        notebook, path, value = _parse_override(text)
        matching = [step for step in spec["steps"] if _is_notebook(step, notebook)]
        if not matching:
            present = ", ".join(dict.fromkeys(step["notebook"] for step in spec["steps"]))
            raise ValueError(
                f"--set {text!r}: notebook {notebook!r} is not part of recipe {spec['name']} (its notebooks: {present})"
            )
        for step in matching:
            declared = notebook_parameters(step["notebook"])
            param = path[0]
            if param not in declared and param not in step["params"]:
                raise ValueError(
                    f"--set {text!r}: notebook {step['notebook']} has no parameter {param!r} "
                    f"(its parameters: {', '.join(declared)})"
                )
            if len(path) > 1 and param not in step["params"]:
                # a key inside a mapping the recipe leaves at the notebook's default: keep the other keys
                step["params"][param] = copy.deepcopy(declared.get(param))
            _set_nested(step["params"], path, value, f"--set {text!r} ({step['notebook']})")
    return spec


def plan_recipe(
    recipe: str,
    data_root: str,
    run_dir: str | os.PathLike,
    *,
    overrides: list[str] = (),
    only: list[str] | None = None,
) -> list[dict]:
    """The steps ``run_recipe`` would execute, in order: ``{notebook, label, target, params}`` with
    the final papermill parameters (``data_root``, ``run_dir`` and the overrides included). Raises
    ValueError for an override or an ``only`` entry that names no notebook of the recipe."""
    spec = apply_overrides(load_recipe(recipe), list(overrides))
    run_dir = Path(run_dir).resolve()
    wanted = [_notebook_key(item.strip()) for item in only or [] if item.strip()]
    unknown = [key for key in wanted if not any(_is_notebook(step, key) for step in spec["steps"])]
    if unknown:
        present = ", ".join(dict.fromkeys(step["notebook"] for step in spec["steps"]))
        raise ValueError(
            f"--only {','.join(unknown)}: not a notebook of recipe {spec['name']} (its notebooks: {present})"
        )
    plan = []
    for step in spec["steps"]:
        notebook = step["notebook"]
        if wanted and not any(_is_notebook(step, key) for key in wanted):
            continue
        values = {"data_root": str(data_root), "run_dir": str(run_dir), **step["params"]}
        label = notebook + (f"-{values['name']}" if "name" in values else "")
        target = run_dir / "notebooks" / f"{label}.ipynb"
        plan.append({"notebook": notebook, "label": label, "target": target, "params": values})
    return plan


def notebook_backbone(notebook: str) -> str | None:
    """The backbone a training notebook trains, as its parameters cell names it (``backbone = ...``);
    None for the other notebooks."""
    return notebook_parameters(notebook).get("backbone")


_LABELS = ("report", "assumption", "toolkit")
# Parameters that wire a run together (names, files, what is submitted): not settings of a method.
PLUMBING = (
    "repo_url",
    "drive_root",
    "data_root",
    "run_dir",
    "name",
    "require_checkpoint",
    "branches",
    "fuse",
    "submit",
    "submission_name",
    "submission_meta",
    "submission_dir",
    "authors",
)


def _comment(line: str) -> str:
    """The trailing ``# ...`` comment of a YAML line (a ``#`` inside quotes is not one)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1 :].strip()
    return ""


def _walk_labels(node, lines: list[str], path: tuple, inherited: str, out: dict) -> None:
    """``out[path] = comment`` for every key of a composed YAML mapping, a key without a comment of
    its own inheriting its parent's."""
    if not isinstance(node, yaml.MappingNode):
        return
    merged = [value for key, value in node.value if key.value == "<<"]  # YAML merge keys (``<<: *anchor``)
    for value in merged:
        for part in value.value if isinstance(value, yaml.SequenceNode) else [value]:
            _walk_labels(part, lines, path, inherited, out)  # the file's own keys below override these
    for key, value in node.value:
        if key.value == "<<":
            continue
        here = path + (key.value,)
        label = _comment(lines[key.start_mark.line]) or inherited
        out[here] = label
        _walk_labels(value, lines, here, label, out)


def setting_labels(recipe: str) -> list[dict[tuple, str]]:
    """Per step of a recipe file, ``{parameter path: the comment on its line}``, e.g.
    ``{("training", "lr"): "report: AdamW, peak learning rate 5e-5"}``: the recipe's own statement of
    where each value comes from ("report: ..." / "assumption ..."); a key without a comment inherits
    its parent's, and the empty string means the file says nothing."""
    path = Path(recipe) if Path(recipe).suffix else RECIPES / f"{recipe}.yaml"
    text = path.read_text()
    lines = text.splitlines()
    root = yaml.compose(text, Loader=_Loader)
    steps = next((v for k, v in root.value if k.value == "steps"), None)
    labels = []
    for step in steps.value if steps is not None else []:
        params = next((v for k, v in step.value if k.value == "params"), None)
        found: dict[tuple, str] = {}
        if params is not None:
            _walk_labels(params, lines, (), "", found)
        labels.append(found)
    return labels


def source_of(label: str) -> str:
    """``report`` / ``assumption`` from a recipe comment, ``recipe`` for a comment that is neither
    (or none)."""
    word = label.split(":")[0].split()[0].lower() if label.strip() else ""
    return word if word in _LABELS else "recipe"


def _flatten(params: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and value and key not in ("submission_meta", "submit"):
            out |= _flatten(value, prefix + (key,))
        else:
            out[prefix + (key,)] = value
    return out


_DERIVED = {("training", "name"), ("training", "backbone"), ("training", "checkpoint")}  # the step's own


def annotated_settings(recipe: str, overrides: list[str] = ()) -> list[dict]:
    """Every effective setting of every step with where it comes from: ``[{notebook, settings:
    [(dotted name, value, source, note)]}]``; source is ``report`` / ``assumption`` (the recipe's
    comment says so), ``recipe`` (set by the file without saying), ``override`` (``--set``) or
    ``default`` (the notebook's or the config's default, the recipe does not set it)."""
    steps = effective_settings(recipe, overrides)
    labels = setting_labels(recipe)
    overridden = [(_parse_override(text)[0], tuple(_parse_override(text)[1])) for text in overrides]
    out = []
    for step, found in zip(steps, labels):
        rows = []
        for path, value in _flatten(step["params"]).items():
            if path[0] in ("repo_url", "drive_root", "data_root", "run_dir") or path in _DERIVED:
                continue
            if any(_is_notebook(step, nb) and path[: len(p)] == p for nb, p in overridden):
                source, note = "override", ""
            else:
                note = found.get(path, "")
                source = source_of(note) if path in found else "default"
            rows.append((".".join(path), value, source, note))
        out.append({"notebook": step["notebook"], "settings": rows})
    return out


def effective_settings(recipe: str, overrides: list[str] = ()) -> list[dict]:
    """What every step of a recipe runs with: the notebook's parameter defaults with the recipe's
    (and the overrides') values laid over them; for a fine-tuning step also ``training`` and
    ``extraction`` as the full ``kit.train.TrainConfig`` / ``kit.embed.ExtractConfig`` they become
    (every field, defaults included). A parameter the notebook does not declare, or a training or
    extraction setting that does not exist, is an error naming it."""
    from kit import embed, train

    spec = apply_overrides(load_recipe(recipe), list(overrides))
    steps = []
    for step in spec["steps"]:
        notebook, declared = step["notebook"], notebook_parameters(step["notebook"])
        unknown = sorted(set(step["params"]) - set(declared))
        if unknown:
            raise ValueError(
                f"recipe {spec['name']}, step {notebook}: unknown parameter(s) {unknown}; "
                f"the notebook's parameters: {', '.join(declared)}"
            )
        params = {**declared, **step["params"]}
        backbone = notebook_backbone(notebook)
        if backbone:
            if params.get("finetune") is False:  # a frozen branch: nothing is trained
                params["training"] = None
            else:
                params["training"] = train.resolve_config(
                    params["training"] or {},
                    index=None,
                    name=params["name"],
                    backbone=backbone,
                    checkpoint=params["checkpoint"] or None,
                ).to_dict()
            params["extraction"] = embed.ExtractConfig.from_dict(params["extraction"] or {}).to_dict()
        steps.append({"notebook": notebook, "params": params})
    return steps


def _execute_notebook(source: Path, target: Path, parameters: dict, kernel: str | None, log_output: bool):
    """Run one notebook under papermill (the one place that does; tests replace it)."""
    import papermill as pm

    pm.execute_notebook(
        str(source),
        str(target),
        parameters=parameters,
        kernel_name=kernel,
        cwd=str(REPO),
        log_output=log_output,
        progress_bar=False,
    )


def run_recipe(
    recipe: str,
    data_root: str,
    run_dir: str | os.PathLike,
    *,
    overrides: list[str] = (),
    only: list[str] | None = None,
    kernel: str | None = None,
    log_output: bool = False,
) -> Path:
    """Execute the recipe's steps in order; returns the run folder. ``overrides``
    (``NB.PARAM=VALUE`` or ``NB.PARAM.KEY=VALUE``) apply to every step of that notebook; ``only``
    keeps the steps whose notebook number/name is listed."""
    name = Path(recipe).stem
    plan = plan_recipe(recipe, data_root, run_dir, overrides=overrides, only=only)
    run_dir = Path(run_dir).resolve()
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    for step in plan:
        start = time.time()
        print(f"[{name}] {step['label']} ...", flush=True)
        _execute_notebook(
            NOTEBOOKS / f"{step['notebook']}.ipynb", step["target"], step["params"], kernel, log_output
        )
        print(f"[{name}] {step['label']} done in {time.time() - start:.0f} s", flush=True)
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
        _execute_notebook(path, out / "notebooks" / path.name, values, kernel, log_output=False)
        outputs.append(out)
    return outputs


# --------------------------------------------------------------------------------------------------
# Command line (./run_all.sh, `dcase-kit run` and `python -m kit.pipeline` are this one parser)
# --------------------------------------------------------------------------------------------------


_EXAMPLES = [
    ("", "the embedded default"),
    ("--only 01", "notebook 01 only"),
    ("audiocc_1 --only 01,02", "two notebooks of a report recipe"),
    ("--set 10.fusion_rule=mean", "a parameter of notebook 10"),
    ("--set 02.training.steps=50", "one key of a mapping parameter"),
    ("eat_asp_4 --dry-run", "show the plan, run nothing"),
    ("--list", "the recipes"),
]


def _examples(prog: str) -> str:
    commands = [f"{prog} {args}".rstrip() for args, _ in _EXAMPLES]
    width = max(map(len, commands)) + 2
    lines = [f"  {command:{width}s}# {comment}" for command, (_, comment) in zip(commands, _EXAMPLES)]
    real = f"  DATA_ROOT=data/dcase2026 BEATS_CHECKPOINT=/ckpt/BEATs_iter3_plus_AS2M.pt {prog} audiocc_1"
    return "\n".join(["examples:", *lines, real]) + "\n"


def build_parser(prog: str = "python -m kit.pipeline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the numbered notebooks (01 data preparation ... 10 fusion and submission)\n"
        "with papermill for one recipe of notebooks/recipes/ (default: the embedded default).",
        epilog=_examples(prog) + "\n" + ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        default="default",
        help="recipe name (see --list) or a YAML path; default: %(default)s",
    )
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DATA_ROOT") or EMBEDDED,
        help='dataset root in the official layout, or "embedded" (default: $DATA_ROOT or embedded)',
    )
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("RUN_DIR") or None,
        help="run folder (default: $RUN_DIR or a new runs/<recipe>-<date>-<time>)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NB.PARAM[.KEY]=VALUE",
        help="override a notebook parameter for every step of notebook NB (e.g. 10.fusion_rule=mean); "
        "with .KEY, one key inside a mapping parameter (02.training.steps=50); VALUE "
        "is YAML; repeatable",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NB[,NB...]",
        help="run only these notebooks (numbers or names: 01,02)",
    )
    parser.add_argument(
        "--kernel", default=os.environ.get("KIT_KERNEL") or None, help="Jupyter kernel (default: $KIT_KERNEL)"
    )
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the notebooks and every effective setting with its source (report, assumption, "
        "recipe, override, default), run nothing",
    )
    return parser


def default_run_dir(recipe: str) -> Path:
    """``runs/<recipe>-<date>-<time>`` in the repository (named after the recipe, never an option)."""
    return REPO / "runs" / f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_plan(plan: list[dict], annotated: list[dict]) -> None:
    """Each step's notebook and target, then every effective setting (defaults included) with its
    source, so the whole system is visible before a long run."""
    by_notebook = {}
    for step in annotated:
        by_notebook.setdefault(step["notebook"], []).append(step["settings"])
    for step in plan:
        print(f"{step['label']} -> {step['target']}")
        rows = [(key, step["params"][key], "run", "") for key in ("data_root", "run_dir")]
        rows += by_notebook.get(step["notebook"], [[]]).pop(0)
        lines = []
        for name, value, source, note in rows:
            shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            shown = shown[: -len("...")].strip() if shown.endswith("...") else shown
            lines.append((f"{name}: {shown}", source, note if source in _LABELS else ""))
        width = min(max(len(text) for text, _, _ in lines), 60)
        for text, source, note in lines:
            print(f"    {text:{width}s}  [{source}]" + (f" {note}" if note else ""))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog or "python -m kit.pipeline").parse_args(argv)
    try:
        if args.list:
            print(describe_recipes())
            return 0
        data_root = args.data_root
        if data_root != EMBEDDED:
            # notebooks run from the repository root: pass the root as the caller meant it
            data_root = str(Path(data_root).expanduser().resolve())
            if not Path(data_root).is_dir():
                raise FileNotFoundError(
                    f"data root {args.data_root} ({data_root}) not found (DATA_ROOT / --data-root: a "
                    'dataset root in the official layout, or "embedded")'
                )
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.recipe)
        only = args.only.split(",") if args.only else None
        if args.dry_run:
            plan = plan_recipe(args.recipe, data_root, run_dir, overrides=args.set, only=only)
            _print_plan(plan, annotated_settings(args.recipe, args.set))
            return 0
        from papermill.exceptions import PapermillExecutionError

        try:
            run_recipe(args.recipe, data_root, run_dir, overrides=args.set, only=only, kernel=args.kernel)
        except PapermillExecutionError as err:
            print(
                f"error: a notebook failed ({err.ename}: {err.evalue}); its executed copy shows where: "
                f"{Path(run_dir).resolve() / 'notebooks'}",
                file=sys.stderr,
            )
            return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run folder: {run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
