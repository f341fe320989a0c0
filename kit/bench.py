"""Benchmarks that print a table (speed and memory are measured here, never asserted in tests).

    python -m kit.bench backbones [--batch 8] [--seconds 10] [--repeats 5] [--device cpu|cuda]

For each backbone at its release size with random weights (BEATs iter3, EAT-base, FISHER-small):
clips/s for a batch of 10-s clips (median of ``--repeats`` timed batches after one warm-up, the two
variants interleaved in one process) and the peak memory (CPU: peak resident memory of a fresh process
that runs only that measurement; GPU: peak allocated memory, bf16 autocast), for the toolkit's
implementation and for an *eager* reference of the same layers kept here: explicit softmax attention
(``softmax(q k^T / sqrt(d) + bias) v``) instead of ``scaled_dot_product_attention``, and the
official per-clip Kaldi fbank loop instead of the batched front-end. The two must give equal outputs
(the max abs difference is printed) so the speed ratio compares like with like.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

RELEASE = {"beats": "release", "eat": "base", "fisher": "small"}


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
    from kit import frontends

    saved = (F.scaled_dot_product_attention, frontends.kaldi_fbank)
    F.scaled_dot_product_attention = eager_attention
    torch.nn.functional.scaled_dot_product_attention = eager_attention
    frontends.kaldi_fbank = looped_fbank
    try:
        yield
    finally:
        F.scaled_dot_product_attention, frontends.kaldi_fbank = saved
        torch.nn.functional.scaled_dot_product_attention = saved[0]


def _inputs(batch: int, seconds: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = int(seconds * 16000)
    waves = 0.1 * torch.randn(batch, n, generator=gen)
    return waves, torch.full((batch,), n)


def _model(name: str, device: str):
    import warnings

    from kit import backbones

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return backbones.load(name, config=RELEASE[name]).to(device).eval()


def _forward(model, waves, lengths, variant: str, cuda: bool) -> tuple[torch.Tensor, float]:
    ctx = eager_mode() if variant == "eager" else contextlib.nullcontext()
    with ctx, torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        start = time.perf_counter()
        tokens, _ = model(waves, lengths)
        if cuda:
            torch.cuda.synchronize()
        return tokens, time.perf_counter() - start


def measure_speed(name: str, batch: int, seconds: float, repeats: int, device: str) -> dict:
    """Both variants in one process, batches interleaved (fast, eager, fast, ...), so a machine whose
    speed drifts affects both alike; the median batch time of each is kept."""
    model = _model(name, device)
    waves, lengths = (t.to(device) for t in _inputs(batch, seconds))
    cuda = device.startswith("cuda")
    outputs = {
        v: _forward(model, waves, lengths, v, cuda)[0].float().cpu() for v in ("fast", "eager")
    }  # warm-up
    times = {"fast": [], "eager": []}
    for _ in range(repeats):
        for variant in times:
            times[variant].append(_forward(model, waves, lengths, variant, cuda)[1])
    median = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    return {
        "backbone": name,
        "config": RELEASE[name],
        "device": device,
        "precision": "bf16 autocast" if cuda else "fp32",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "clips_per_s": batch / median["fast"],
        "eager_clips_per_s": batch / median["eager"],
        "speedup": median["eager"] / median["fast"],
        "max_abs_diff": float((outputs["fast"] - outputs["eager"]).abs().max()),
    }


def measure_memory(name: str, variant: str, batch: int, seconds: float, device: str) -> float:
    """Peak memory (MB) of one forward pass: the process's peak resident set on the CPU (run it in a
    fresh process), the peak allocated memory on a GPU."""
    model = _model(name, device)
    waves, lengths = (t.to(device) for t in _inputs(batch, seconds))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _forward(model, waves, lengths, variant, cuda)
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_isolated(args, *what) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "kit.bench",
        *what,
        "--batch",
        str(args.batch),
        "--seconds",
        str(args.seconds),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step {what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def backbones_table(args) -> list[dict]:
    rows = []
    for name in args.backbones:
        row = _run_isolated(args, "_speed", name)
        row["peak_mb"] = _run_isolated(args, "_memory", name, "fast")["peak_mb"]
        row["eager_peak_mb"] = _run_isolated(args, "_memory", name, "eager")["peak_mb"]
        rows.append(row)
    return rows


def print_table(rows: list[dict], batch: int, seconds: float) -> None:
    print(f"\nbackbones at release size, random weights, batch {batch} x {seconds:g} s clips")
    header = (
        f"{'backbone':8s} {'config':7s} {'params':>7s} {'device':6s} {'precision':13s} {'clips/s':>8s} "
        f"{'eager':>8s} {'speedup':>7s} {'peak MB':>8s} {'eager MB':>8s} {'max|diff|':>9s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['backbone']:8s} {r['config']:7s} {r['params_m']:6.1f}M {r['device']:6s} {r['precision']:13s} "
            f"{r['clips_per_s']:8.2f} {r['eager_clips_per_s']:8.2f} {r['speedup']:6.2f}x {r['peak_mb']:8.0f} "
            f"{r['eager_peak_mb']:8.0f} {r['max_abs_diff']:9.1e}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="toolkit benchmarks")
    parser.add_argument("what", choices=["backbones", "_speed", "_memory"])
    parser.add_argument("name", nargs="?")
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--backbones", nargs="+", default=["beats", "eat", "fisher"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "_speed":
        print(json.dumps(measure_speed(args.name, args.batch, args.seconds, args.repeats, args.device)))
        return 0
    if args.what == "_memory":
        peak = measure_memory(args.name, args.variant, args.batch, args.seconds, args.device)
        print(json.dumps({"peak_mb": peak}))
        return 0
    print_table(backbones_table(args), args.batch, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
