"""The run manifest ``<run_dir>/run.yaml``: what each stage produced, so later stages never guess.

Each notebook records its outputs here and later notebooks read them: the data root and index (01),
each branch's model folder, embedding folder, parameter count and effective settings (02-08), the
scored systems and the scoring settings (09), the fusion actually done, the development score files
and the submission (10). Paths are stored relative to the run folder, so a copied or hard-linked run
folder (``kit.pipeline.sweep``) reads its own files. The file is rewritten atomically at every
update; a stage that runs again replaces its own entry, so switching settings back and forth always
points at the embeddings of the last run.

Layout (every section optional until its stage has run)::

    data_root: /abs/path/of/the/dataset
    index: index.csv
    branches:
      beats: {backbone: beats, model_dir: beats, embeddings: embeddings/beats-0123abcd4567,
              parameters: 90345216, train: {...TrainConfig...}, extract: {...ExtractConfig...}}
    scores: {folder: scores, systems: [beats-knn-near, ...], settings: {knn_k: 1, ...}}
    fusion: {rule: bayes, systems: [...], weights: {...}, normalisation: train}
    dev_scores: {folder: dev_scores, systems: [...]}
    submission: {zip: /abs/submissions/x.zip, systems: {Label_task2_1: fusion}} or {skipped: reason}
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from kit.files import write_text_atomic

FILE_NAME = "run.yaml"


COLLAPSE_COSINE = 0.999  # mean cosine similarity between clips above which embeddings have collapsed


def path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILE_NAME


def read(run_dir: str | os.PathLike) -> dict:
    """The manifest of ``run_dir`` ({} when no stage has written one yet)."""
    file = path(run_dir)
    if not file.exists():
        return {}
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"run manifest {file} is not valid YAML: {err}") from err
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"run manifest {file} must hold a mapping, found {type(content).__name__}")
    return content


def update(run_dir: str | os.PathLike, **sections) -> dict:
    """Replace the given top-level sections (``update(run_dir, scores={...})``) and write the file."""
    content = read(run_dir)
    content.update(sections)
    write_text_atomic(path(run_dir), yaml.safe_dump(_plain(content), sort_keys=False))
    return content


def record_branch(run_dir: str | os.PathLike, name: str, **entry) -> dict:
    """Record (or replace) branch ``name``: its backbone, model folder, embedding folder, ... (a branch
    made by a model whose training recorded itself with :func:`record_model` gets that record too:
    e.g. the pseudo-labels it trained on)."""
    run_dir = Path(run_dir)
    entry = {
        key: relative(run_dir, value) if isinstance(value, Path) else value for key, value in entry.items()
    }
    trained = (read(run_dir).get("models") or {}).get(entry.get("band_of", name)) or {}
    entry = {**trained, **entry}
    branches = dict(read(run_dir).get("branches") or {})
    branches[name] = entry
    return update(run_dir, branches=branches)


def record_model(run_dir: str | os.PathLike, name: str, **entry) -> dict:
    """What the training of model ``name`` wants its branches to carry (``models: {name: ...}``),
    e.g. ``pseudo_labels``: the file, settings and class counts of the KMeans labels it trained on."""
    run_dir = Path(run_dir)
    models = dict(read(run_dir).get("models") or {})
    models[name] = {**(models.get(name) or {}), **entry}
    return update(run_dir, models=models)


def branch(run_dir: str | os.PathLike, name: str) -> dict:
    """The recorded entry of branch ``name``; an unknown name lists the branches there are."""
    branches = read(run_dir).get("branches") or {}
    if name not in branches:
        known = ", ".join(sorted(branches)) or "none yet"
        raise KeyError(
            f"branch {name!r} is not recorded in {path(run_dir)} (recorded: {known}): run its fine-tuning "
            "notebook (02-04) with this name first"
        )
    return branches[name]


def embedding_folder(run_dir: str | os.PathLike, name: str) -> Path:
    """The embedding folder that branch ``name``'s last extraction wrote."""
    folder = Path(run_dir) / branch(run_dir, name)["embeddings"]
    if not folder.is_dir():
        raise FileNotFoundError(f"{path(run_dir)} names {folder} for branch {name!r}, but it does not exist")
    return folder


def relative(run_dir: str | os.PathLike, target: str | os.PathLike) -> str:
    """``target`` relative to ``run_dir`` when inside it, else absolute (as a string)."""
    target, run_dir = Path(target).absolute(), Path(run_dir).absolute()
    try:
        return target.relative_to(run_dir).as_posix()
    except ValueError:
        return str(target)


def _plain(value):
    """Tuples and paths as YAML-safe lists and strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return value.item()
    return value


def system_resources(run_dir: str | os.PathLike, system: str) -> tuple[int, int | None]:
    """``(subsystems, total parameters)`` of a scored system, from what the stages recorded: a fusion
    counts its fused branches and sums the parameters of their models; a single branch
    ``<branch>-<backend>-<policy>`` is one subsystem with its model's parameters; the autoencoder
    baseline counts its models (one per machine type). None where the run did not record a count."""
    content = read(run_dir)
    if system.startswith("fusion"):
        fused = (content.get("fusion") or {}).get("systems")
        if not fused:
            raise KeyError(f"{path(run_dir)} records no fusion: run notebook 10's fusion step first")
        counts = [_parameters(content, model) for model in {_model_of(content, name) for name in fused}]
        return len(fused), None if None in counts else sum(counts)
    return 1, _parameters(content, _model_of(content, system))


def _model_of(content: dict, system: str) -> str:
    """The model a scored system stands on: the longest recorded branch name it starts with."""
    if system.startswith("baseline-"):
        return "baseline"
    names = [name for name in (content.get("branches") or {}) if system.startswith(f"{name}-")]
    return max(names, key=len) if names else system


def _parameters(content: dict, model: str) -> int | None:
    if model == "baseline":
        return (content.get("scores") or {}).get("baseline_parameters")
    return ((content.get("branches") or {}).get(model) or {}).get("parameters")


def notes(run_dir: str | os.PathLike, systems) -> dict[str, str]:
    """A note for every system whose branch's embeddings collapsed (``kit.embed.check_collapse``
    recorded ``collapse`` figures at extraction), for the results table: its score says nothing."""
    content = read(run_dir)
    found = {}
    for system in systems:
        model = _model_of(content, system)
        figures = ((content.get("branches") or {}).get(model) or {}).get("collapse") or {}
        collapsed = {channel: f for channel, f in figures.items() if f is not None and f >= COLLAPSE_COSINE}
        if collapsed:
            found[system] = "collapsed embeddings: " + ", ".join(
                f"{channel} mean cosine {f:.6f}" for channel, f in collapsed.items()
            )
    return found
