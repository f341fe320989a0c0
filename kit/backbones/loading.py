"""Checkpoint loading shared by every backbone: read the file, let the backbone filter it, load strictly.

``load_checkpoint(path, backbone, filter_state, make_model)``:

1. :func:`checkpoint_file` finds the file(s): a file as is; a folder in the Hugging Face layout
   (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin`` where a repo publishes that), a
   ``kit.train`` run folder (``model.pt``), or a folder holding exactly one ``.pt`` / ``.pth`` file;
2. :func:`read_checkpoint` reads it without running pickled code (``torch.load(weights_only=True)``,
   a ``.safetensors`` file with safetensors); a Hugging Face folder reads as
   ``{"config.json": dict, "model.safetensors": {name: tensor}}`` (the weights under that key whichever
   file held them). A file that is a web page (a share link saved instead of the file it points to)
   is named as such, with what to do; whatever else goes wrong while reading becomes a
   :class:`CheckpointError` naming the file. No message ever suggests reading a file with
   ``weights_only`` off, which would run the pickled code of a file of unknown origin;
3. the backbone's pure ``filter_state(raw) -> (config, state)`` recognises the source layout from the
   keys, refuses other backbones' files, reads the architecture and renames the weights into its own
   module names (its ``CheckpointError`` gets the path put in front);
4. :func:`strict_load` builds nothing itself: it checks ``state`` against ``make_model(config)``
   (every key present, none extra, every value a tensor of the expected shape, naming the offending
   keys and shapes) and loads it. The model is marked ``pretrained`` here, and only here.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kit.backbones import DEFAULT_CACHE, CheckpointError, CheckpointNotFoundError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_TORCH_WEIGHTS = "pytorch_model.bin"  # the older Hugging Face weights file (a torch pickle)
RUN_MODEL = "model.pt"  # what kit.train writes into a run folder
TORCH_SUFFIXES = (".pt", ".pth")
HTML_STARTS = (b"<!doctype", b"<html", b"<head", b"<?xml")

# What torch.load raises on damaged, truncated or foreign files (legacy pickle or zip format).
READ_ERRORS = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    AttributeError,
    IndexError,
    TypeError,
    ImportError,
    zipfile.BadZipFile,
)


def checkpoint_file(path: str | os.PathLike, backbone: str) -> Path:
    """The file to read for ``path``, or for a Hugging Face folder the folder itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{backbone} checkpoint not found: {path}")
    weights = HF_WEIGHTS if (path / HF_WEIGHTS).is_file() else HF_TORCH_WEIGHTS
    hf_present = [name for name in (HF_CONFIG, weights) if (path / name).is_file()]
    if len(hf_present) == 2:
        return path
    if (path / RUN_MODEL).is_file():
        return path / RUN_MODEL
    candidates = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    absent = [name for name in (HF_CONFIG, HF_WEIGHTS) if name not in hf_present]
    hf_note = (
        f"; a Hugging Face folder needs {HF_CONFIG} and {HF_WEIGHTS}, missing {absent}" if hf_present else ""
    )
    raise CheckpointError(
        f"{path}: expected one {backbone} checkpoint file (.pt / .pth) in this folder, or a Hugging Face "
        f"folder ({HF_CONFIG} + {HF_WEIGHTS}), found {sorted(p.name for p in path.iterdir())}{hf_note}"
    )


def read_checkpoint(path: str | os.PathLike, backbone: str) -> object:
    """What a checkpoint holds: the unpickled object of a torch file, the tensors of a
    ``.safetensors`` file, or ``{"config.json": dict, "model.safetensors": tensors}`` for a folder
    (its ``model.safetensors``, else its ``pytorch_model.bin``)."""
    path = Path(path)
    if path.is_dir():
        safetensors = path / HF_WEIGHTS
        weights = (
            _read_safetensors(safetensors, backbone)
            if safetensors.is_file()
            else _torch_load(path / HF_TORCH_WEIGHTS, backbone)
        )
        return {HF_CONFIG: _read_json(path / HF_CONFIG), HF_WEIGHTS: weights}
    refuse_web_page(path, backbone)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, backbone)
    return _torch_load(path, backbone)


def is_web_page(path: str | os.PathLike) -> bool:
    """Whether a file starts like an HTML (or XML) document: what a share link gives instead of the
    file it points to (OneDrive, Google Drive, a login page)."""
    with open(path, "rb") as file:
        head = file.read(512)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(HTML_STARTS)


def refuse_web_page(path: str | os.PathLike, backbone: str) -> None:
    """A :class:`CheckpointError` saying what to do when ``path`` is a web page, not a checkpoint."""
    path = Path(path)
    if not (path.is_file() and is_web_page(path)):
        return
    removed = ""
    if path.parent == Path(DEFAULT_CACHE) / "urls":  # a URL's download: do not serve the page again
        path.unlink()
        removed = " (the downloaded page was removed from the cache)"
    raise CheckpointError(
        f"{path} is a web page (HTML), not a {backbone} checkpoint{removed}: the link it was downloaded "
        "from is a share or sign-in page, not the file itself. Open that link in a browser, download the "
        "file from there (or use a direct link) and pass the downloaded file's path; "
        "`dcase-kit checkpoints` lists where each release comes from and how to get it"
    )


def describe_load_error(err: BaseException) -> str:
    """``torch.load``'s error without its advice to retry with ``weights_only=False`` or to allow-list
    classes (both would run the pickled code of a file of unknown origin): only what was found."""
    text = str(err)
    if "weights_only" not in text and "WeightsUnpickler" not in text:
        return f"{type(err).__name__}: {text}"
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    detail = " ".join(detail.split(" Please use", 1)[0].split("Check the documentation", 1)[0].split())
    return "a safe read (tensors and plain containers only) refused it" + (f": {detail}" if detail else "")


def _read_json(file: Path) -> dict:
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{file}: not valid JSON: {err}") from err
    if not isinstance(fields, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(fields).__name__}")
    return fields


def _read_safetensors(file: Path, backbone: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {backbone} checkpoint {file}: not a readable safetensors file ({err})"
        ) from err


def _torch_load(path: Path, backbone: str) -> object:
    """``torch.load`` without running pickled code. Training bookkeeping in official files (fairseq
    meters, numpy scalars, enums) refers to classes that may not be installed; they are replaced by
    inert placeholders, since only configs and tensors are read."""

    class Placeholder:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __setstate__(self, state) -> None:
            pass

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except READ_ERRORS:  # the legacy format, or damaged: torch.load below tells which
        unsafe = []
    try:
        with torch.serialization.safe_globals([(Placeholder, name) for name in unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        raise CheckpointError(
            f"cannot read {backbone} checkpoint {path}: not a readable torch checkpoint "
            f"(corrupt, truncated or not a .pt file; {describe_load_error(err)})"
        ) from err


def rename_prefix(key: str, renames) -> str:
    """A release's key in this toolkit's names: the first ``(old, new)`` prefix of ``renames`` that
    ``key`` starts with is replaced; a key without one keeps its name, so the strict load names it as
    it is in the file."""
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _listed(keys: list[str], limit: int = 10) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def strict_load(
    model: nn.Module, state: dict, source: str | os.PathLike, backbone: str, hint: str = ""
) -> nn.Module:
    """Load ``state`` into ``model`` after checking that the keys match exactly and every value is a
    tensor of the expected shape; a :class:`CheckpointError` names the file, the keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {backbone} weights do not match the model built from its configuration: "
            f"missing {_listed(missing)}, unexpected {_listed(unexpected)}{hint}"
        )
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(tensor).__name__}, expected a tensor")
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)} in the checkpoint but the "
                f"{backbone} model built from its configuration expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)
    return model


def load_checkpoint(
    path: str | os.PathLike,
    backbone: str,
    filter_state: Callable[[object], tuple[object, dict]],
    make_model: Callable[[object], nn.Module],
    hint: str = "",
) -> nn.Module:
    """Read ``path``, filter it with the backbone's ``filter_state``, build ``make_model(config)`` and
    load the weights strictly. ``backbone`` is the name used in messages; ``hint`` is appended to a
    key mismatch message."""
    file = checkpoint_file(path, backbone)
    raw = read_checkpoint(file, backbone)
    try:
        config, state = filter_state(raw)
    except CheckpointError as err:
        raise CheckpointError(f"{file}: {err}") from err
    model = strict_load(make_model(config), state, file, backbone, hint)
    model.pretrained = True
    return model
