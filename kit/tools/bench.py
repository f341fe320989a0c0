"""Benchmarks that print a table (speed and memory are measured here, never asserted in tests).

    python -m kit.tools.bench backbones [--backbones beats eat fisher efficientat] [--batch 8] [--seconds 10]
                                        [--extract-batch 8] [--extract-seconds 16] [--repeats 5]
                                        [--device cpu|cuda] [--precision auto]
    python -m kit.tools.bench loader    [--clips 32] [--clip-seconds 16] [--crop-seconds 5] [--batch 16]
                                        [--batches 20] [--workers 0 2] [--repeats 3]
    python -m kit.tools.bench train     [--recipes audiocc_1 ...] [--steps 5] [--batch B] [--workers N]
                                        [--device cpu|cuda] [--precision auto]

The same through the ``dcase-kit`` command: ``dcase-kit bench backbones``, ``dcase-kit bench loader``,
``dcase-kit bench train``.

``backbones``: for each backbone at its release sizes with random weights (``bench_train.BENCHED``,
whose configurations come from each backbone module's ``RELEASES``: BEATs iter3, EAT-base,
FISHER-small, EfficientAT mn04 and mn10, NA-BEATs: BEATs_iter3 sizes + 12 fusion blocks,
its reference input the batch's other clips; ``--backbones efficientat`` gives its two rows alone):
clips/s for a batch of 10-s clips (median of ``--repeats`` timed batches after one
warm-up, the two variants interleaved in one process) and the peak memory (CPU: peak resident memory
of a fresh process that runs only that measurement; GPU: peak allocated memory), for the toolkit's
implementation and for an *eager* reference of the same layers kept here: explicit softmax attention
(``softmax(q k^T / sqrt(d) + bias) v``) instead of ``scaled_dot_product_attention``, and the
official per-clip Kaldi fbank loop instead of the batched front-end. The two must give equal outputs
(the max abs difference is printed) so the speed ratio compares like with like (EfficientAT, a CNN,
has neither: its two variants are the same code, speedup ~1). Then the extraction
throughput: clips/s of a no-grad forward pass of batches of 16-s clips (EAT with the EAT-ASP input
length, ``target_length`` 1600 frames) and its peak memory, in a fresh process per backbone. Every
forward pass runs in the precision ``kit.precision`` picks for the device (``--precision`` forces one).

``loader``: clips/s of the training loader alone (no model), on generated 16-s stereo WAVs in a
temporary folder: items are (clip, channel) pairs with a random crop each, as in training, read
either the old way (decode the whole file, keep one channel, crop) or the lean way
(``kit.data.read_clip``: seek to the crop and decode only it), through a DataLoader with each of
``--workers``. Both readers get the same batches and must return equal waves (checked). The files
were just written, so they sit in the page cache: the table compares decoding and copying, not disk
reads (from a network drive, like Colab's mounted Drive, reading a third of the bytes gains more).

``train``: each recipe's fine-tuning setting at release size, a few real steps of ``kit.train``
(``kit/tools/bench_train.py`` says how it is measured).

Adding a command: write ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` (which prints
one table) and list them in ``COMMANDS``; ``--threads`` and ``--repeats`` are common to all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from kit import data
from kit import precision as precision_policy
from kit.tools import bench_train

# ----------------------------------------------------------------------------------------------
# backbones: fast vs eager reference, and extraction throughput


def eager_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """Reference attention: explicit scores, additive/boolean mask, softmax, weighted sum."""
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = (query @ key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ value


def looped_fbank(waves, lengths=None, **options):
    """The official front-ends' way: torchaudio's Kaldi fbank one clip at a time."""
    import torchaudio.compliance.kaldi as kaldi

    lengths = lengths if lengths is not None else torch.full((waves.shape[0],), waves.shape[1])
    feats = [kaldi.fbank(waves[i, : int(lengths[i])][None], **options) for i in range(waves.shape[0])]
    n_frames = torch.tensor([f.shape[0] for f in feats])
    out = waves.new_zeros(len(feats), int(n_frames.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, n_frames


@contextlib.contextmanager
def eager_mode():
    """Swap in the eager reference pieces for the duration of the block."""
    from kit import features

    saved = (F.scaled_dot_product_attention, features.kaldi_fbank)
    F.scaled_dot_product_attention = eager_attention
    torch.nn.functional.scaled_dot_product_attention = eager_attention
    features.kaldi_fbank = looped_fbank
    try:
        yield
    finally:
        F.scaled_dot_product_attention, features.kaldi_fbank = saved
        torch.nn.functional.scaled_dot_product_attention = saved[0]


def _inputs(batch: int, seconds: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    waves = 0.1 * torch.randn(batch, n, generator=gen)
    return waves, torch.full((batch,), n)


def _input_options(name: str, seconds: float | None) -> dict:
    """EAT takes a fixed number of fbank frames: enough for ``seconds`` (16 s: 1600, as EAT-ASP)."""
    if name != "eat" or seconds is None:
        return {}
    frames = 1 + (int(seconds * 16000) - 400) // 160  # 25-ms windows every 10 ms
    return {"target_length": max(1024, 16 * math.ceil(frames / 16))}


def _model(name: str, device: str, config: str | None = None, seconds: float | None = None):
    import warnings

    from kit import backbones

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config or bench_train.release_configs(name)[0]
        model = backbones.load(name, config=config, **_input_options(name, seconds))
    return model.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reference(model, waves, lengths) -> dict:
    """A noise reference for a backbone that takes one (nabeats): the batch's other clips."""
    if not getattr(model, "takes_reference", False):
        return {}
    return {"reference": waves.roll(1, 0), "reference_lengths": lengths.roll(1, 0)}


def _forward(model, waves, lengths, variant: str, prec) -> tuple[torch.Tensor, float]:
    ctx = eager_mode() if variant == "eager" else contextlib.nullcontext()
    with ctx, torch.inference_mode(), prec.autocast():
        start = time.perf_counter()
        tokens, _ = model(waves, lengths, **_reference(model, waves, lengths))
        _sync(str(waves.device))
        return tokens, time.perf_counter() - start


def _precision_label(prec) -> str:
    return prec.mode + (" tf32" if prec.tf32 else "")


def measure_speed(
    name: str,
    batch: int,
    seconds: float,
    repeats: int,
    device: str,
    precision: str = "auto",
    config: str | None = None,
) -> dict:
    """Both variants in one process, batches interleaved (fast, eager, fast, ...), so a machine whose
    speed drifts affects both alike; the median batch time of each is kept."""
    prec = precision_policy.resolve(precision, device)
    model = _model(name, device, config)
    waves, lengths = (t.to(device) for t in _inputs(batch, seconds))
    outputs = {
        v: _forward(model, waves, lengths, v, prec)[0].float().cpu() for v in ("fast", "eager")
    }  # warm-up
    times = {"fast": [], "eager": []}
    for _ in range(repeats):
        for variant in times:
            times[variant].append(_forward(model, waves, lengths, variant, prec)[1])
    median = {v: statistics.median(t) for v, t in times.items()}
    return {
        "backbone": name,
        "config": config or bench_train.release_configs(name)[0],
        "device": device,
        "precision": _precision_label(prec),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "clips_per_s": batch / median["fast"],
        "eager_clips_per_s": batch / median["eager"],
        "speedup": median["eager"] / median["fast"],
        "max_abs_diff": float((outputs["fast"] - outputs["eager"]).abs().max()),
    }


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(
    name: str,
    variant: str,
    batch: int,
    seconds: float,
    device: str,
    precision: str = "auto",
    config: str | None = None,
) -> float:
    """Peak memory (MB) of one forward pass: the process's peak resident set on the CPU (run it in a
    fresh process), the peak allocated memory on a GPU."""
    prec = precision_policy.resolve(precision, device)
    model = _model(name, device, config)
    waves, lengths = (t.to(device) for t in _inputs(batch, seconds))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _forward(model, waves, lengths, variant, prec)
    return _peak_mb(device)


def measure_extraction(
    name: str,
    batch: int,
    seconds: float,
    repeats: int,
    device: str,
    precision: str = "auto",
    config: str | None = None,
) -> dict:
    """Embedding extraction's forward pass: no-grad, batches of ``seconds``-long clips, in the
    policy's precision; clips/s from the median of ``repeats`` batches after one warm-up, and the
    peak memory (run it in a fresh process for the CPU figure)."""
    prec = precision_policy.resolve(precision, device)
    model = _model(name, device, config, seconds)
    waves, lengths = (t.to(device) for t in _inputs(batch, seconds, seed=1))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def timed() -> float:
        with torch.no_grad(), prec.autocast():
            start = time.perf_counter()
            tokens, _ = model(waves, lengths, **_reference(model, waves, lengths))
            _sync(device)
            elapsed = time.perf_counter() - start
        if not torch.isfinite(tokens).all():
            raise FloatingPointError(f"{name}: non-finite tokens in {prec.describe()}")
        return elapsed

    timed()  # warm-up
    median = statistics.median(timed() for _ in range(repeats))
    return {
        "extract_clips_per_s": batch / median,
        "extract_peak_mb": _peak_mb(device),
        "extract_precision": _precision_label(prec),
    }


def _run_isolated(args, config: str, *what) -> dict:
    """One measurement of the release-size ``config`` in a fresh process (its peak memory is then its own)."""
    cmd = [sys.executable, "-m", "kit.tools.bench", *what, "--config", config]
    for flag in ("batch", "seconds", "extract_batch", "extract_seconds", "repeats", "device", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step {what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def backbones_table(args) -> list[dict]:
    rows = []
    for name in args.backbones:
        for config in bench_train.release_configs(name):
            row = _run_isolated(args, config, "_speed", name)
            row["peak_mb"] = _run_isolated(args, config, "_memory", name, "fast")["peak_mb"]
            row["eager_peak_mb"] = _run_isolated(args, config, "_memory", name, "eager")["peak_mb"]
            row.update(_run_isolated(args, config, "_extract", name))
            rows.append(row)
    return rows


def print_backbones_table(rows: list[dict], args) -> None:
    print(
        f"\nbackbones at release size, random weights; speed: batch {args.batch} x {args.seconds:g} s clips; "
        f"extraction: no-grad forward, batch {args.extract_batch} x {args.extract_seconds:g} s clips"
    )
    header = (
        f"{'backbone':11s} {'config':7s} {'params':>7s} {'device':6s} {'precision':10s} {'clips/s':>8s} "
        f"{'eager':>8s} {'speedup':>7s} {'peak MB':>8s} {'eager MB':>8s} {'max|diff|':>9s} "
        f"{'extract/s':>9s} {'extr. MB':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['backbone']:11s} {r['config']:7s} {r['params_m']:6.1f}M {r['device']:6s} "
            f"{r['precision']:10s} "
            f"{r['clips_per_s']:8.2f} {r['eager_clips_per_s']:8.2f} {r['speedup']:6.2f}x {r['peak_mb']:8.0f} "
            f"{r['eager_peak_mb']:8.0f} {r['max_abs_diff']:9.1e} {r['extract_clips_per_s']:9.2f} "
            f"{r['extract_peak_mb']:8.0f}"
        )


def add_backbones_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    benched = list(bench_train.BENCHED)
    parser.add_argument("--backbones", nargs="+", default=benched, choices=benched)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--extract-batch", type=int, default=8)
    parser.add_argument("--extract-seconds", type=float, default=16.0)
    parser.add_argument("--precision", default="auto", choices=precision_policy.PRECISIONS)


def run_backbones(args) -> int:
    print_backbones_table(backbones_table(args), args)
    return 0


def run_speed(args) -> int:
    row = measure_speed(
        args.name, args.batch, args.seconds, args.repeats, args.device, args.precision, args.config
    )
    print(json.dumps(row))
    return 0


def run_memory(args) -> int:
    peak = measure_memory(
        args.name, args.variant, args.batch, args.seconds, args.device, args.precision, args.config
    )
    print(json.dumps({"peak_mb": peak}))
    return 0


def run_extract(args) -> int:
    row = measure_extraction(
        args.name,
        args.extract_batch,
        args.extract_seconds,
        args.repeats,
        args.device,
        args.precision,
        args.config,
    )
    print(json.dumps(row))
    return 0


def add_isolated_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(bench_train.BENCHED))
    parser.add_argument("variant", nargs="?", default="fast", choices=["fast", "eager"])
    parser.add_argument("--config", default=None, help="the release-size configuration to build")
    add_backbones_arguments(parser)


# ----------------------------------------------------------------------------------------------
# loader: decode the whole file vs seek and read the crop


def write_loader_clips(folder: str | Path, n_clips: int, seconds: float, seed: int = 0) -> list[Path]:
    """``n_clips`` stereo 16-bit 16-kHz WAVs of ``seconds`` (the official format): a tone with
    harmonics plus noise on the near channel, more noise on the far one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = round(seconds * data.SAMPLE_RATE)
    t = np.arange(n) / data.SAMPLE_RATE
    paths = []
    for i in range(n_clips):
        f0 = rng.uniform(80, 400)
        machine = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) for k in (1, 2, 3))
        near = machine + 0.02 * rng.standard_normal(n)
        far = 0.3 * machine + 0.1 * rng.standard_normal(n)
        path = folder / f"clip_{i:04d}.wav"
        sf.write(path, np.stack([near, far], axis=1).astype(np.float32), data.SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


class CropItems(Dataset):
    """Training-loader items without a model: ``(item, seed) -> random crop`` of one (clip, channel),
    read ``"whole"`` (decode the file, keep the channel, crop) or ``"lean"`` (``read_clip``)."""

    def __init__(self, paths: list[Path], length: data.LengthPolicy, reader: str):
        if reader not in ("whole", "lean"):
            raise ValueError(f"reader must be 'whole' or 'lean', got {reader!r}")
        self.items = [(str(p), channel) for p in paths for channel in ("near", "far")]
        self.length, self.reader = length, reader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, seed = key
        path, channel = self.items[index]
        rng = np.random.default_rng(seed)
        if self.reader == "whole":
            wave, _ = self.length.apply_with_length(data.load_audio(path, channel), rng)
        else:
            wave, _ = data.read_clip(path, channel, self.length, rng)
        return torch.from_numpy(np.ascontiguousarray(wave))


def loader_batches(n_items: int, batch: int, n_batches: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Random ``(item, crop seed)`` batches, the same for every reader."""
    rng = np.random.default_rng(seed)
    return [
        [
            (int(i), int(s))
            for i, s in zip(rng.integers(n_items, size=batch), rng.integers(2**31 - 1, size=batch))
        ]
        for _ in range(n_batches)
    ]


def measure_loader(
    paths: list[Path],
    length: data.LengthPolicy,
    reader: str,
    batch: int,
    batches: int,
    workers: int,
    seed: int = 0,
) -> tuple[float, torch.Tensor]:
    """clips/s of a DataLoader over ``CropItems``: ``batches`` batches timed after one warm-up batch
    (worker start-up), and the first batch (to check that the readers agree)."""
    plan = loader_batches(2 * len(paths), batch, batches + 1, seed)
    loader = DataLoader(
        CropItems(paths, length, reader), batch_sampler=plan, num_workers=workers, collate_fn=torch.stack
    )
    it = iter(loader)
    first = next(it)
    start = time.perf_counter()
    count = sum(len(b) for b in it)
    return count / (time.perf_counter() - start), first


def loader_table(args, folder: str | Path) -> list[dict]:
    paths = write_loader_clips(folder, args.clips, args.clip_seconds)
    length = data.LengthPolicy("random_crop", seconds=args.crop_seconds)
    rows = []
    for workers in args.workers:
        speeds = {"whole": [], "lean": []}
        for repeat in range(args.repeats):
            firsts = {}
            for reader in speeds:  # interleaved, so a drifting machine affects both alike
                speed, firsts[reader] = measure_loader(
                    paths, length, reader, args.batch, args.batches, workers, seed=repeat
                )
                speeds[reader].append(speed)
            if not torch.equal(firsts["whole"], firsts["lean"]):
                raise AssertionError("the lean reader returned other waves than the whole-file reader")
        whole, lean = (statistics.median(speeds[r]) for r in ("whole", "lean"))
        rows.append(
            {
                "workers": workers,
                "whole_clips_per_s": whole,
                "lean_clips_per_s": lean,
                "speedup": lean / whole,
            }
        )
    return rows


def print_loader_table(rows: list[dict], args) -> None:
    print(
        f"\ntraining loader alone: random {args.crop_seconds:g}-s crops of one channel of {args.clips} stereo "
        f"{args.clip_seconds:g}-s 16-bit WAVs (page cache), batch {args.batch}, {args.batches} batches, "
        f"median of {args.repeats}; waves equal: yes"
    )
    header = f"{'workers':>7s} {'whole file clips/s':>18s} {'crop only clips/s':>17s} {'speedup':>7s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['workers']:7d} {r['whole_clips_per_s']:18.1f} {r['lean_clips_per_s']:17.1f} {r['speedup']:6.2f}x"
        )


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--clip-seconds", type=float, default=16.0)
    parser.add_argument("--crop-seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])


def run_loader(args) -> int:
    with tempfile.TemporaryDirectory(prefix="kit-bench-loader-") as folder:
        rows = loader_table(args, folder)
    print_loader_table(rows, args)
    return 0


# ----------------------------------------------------------------------------------------------
# Commands

COMMANDS = {
    # name: (help, add arguments, run); names starting with "_" are the isolated steps of others
    "backbones": ("backbone speed, memory and extraction throughput", add_backbones_arguments, run_backbones),
    "loader": ("training loader: whole-file decode vs crop-only reads", add_loader_arguments, run_loader),
    "train": (
        "each recipe's training setting: steps/s, clips/s, peak memory",
        bench_train.add_train_arguments,
        bench_train.run_train,
    ),
    "_speed": (argparse.SUPPRESS, add_isolated_arguments, run_speed),
    "_memory": (argparse.SUPPRESS, add_isolated_arguments, run_memory),
    "_extract": (argparse.SUPPRESS, add_isolated_arguments, run_extract),
    "_train": (argparse.SUPPRESS, bench_train.add_isolated_train_arguments, bench_train.run_train_one),
}


def build_parser(prog: str = "python -m kit.tools.bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="toolkit benchmarks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{backbones,loader,train}")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--threads", type=int, default=torch.get_num_threads())
        sub.add_argument("--repeats", type=int, default=5 if name != "loader" else 3)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m kit.tools.bench") -> int:
    args = build_parser(prog).parse_args(argv)
    torch.set_num_threads(args.threads)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
