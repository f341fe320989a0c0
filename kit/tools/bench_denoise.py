"""Benchmark of the far-channel cancellers: ``python -m kit.tools.bench_denoise`` (``dcase-kit bench-denoise``).

Runs every canceller of ``kit.denoise`` (default settings) on a batch of stereo clips (default 8 x 10 s
at 16 kHz, random noise: the cost does not depend on the content) and prints milliseconds per clip,
the best of ``--repeats`` runs after one warm-up, so the front-end's cost can be set beside a backbone's
forward pass (``python -m kit.tools.bench backbones``: BEATs at release size runs about 1 clip/s on this
project's CPU). ``--threads`` sets torch's intra-op threads (default 1: one core of a shared machine);
``--device cuda`` times on a GPU (synchronised).
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd
import torch

from kit import denoise


def time_cancellers(
    batch: int = 8, seconds: float = 10.0, repeats: int = 3, device: str = "cpu", backward: bool = False
) -> pd.DataFrame:
    """One row per canceller: ms per clip for the batch (forward, and forward + backward if asked)."""
    generator = torch.Generator().manual_seed(0)
    pair = torch.randn(batch, 2, int(seconds * 16_000), generator=generator).to(device)

    def run(method: str, with_backward: bool) -> float:
        best = float("inf")
        for attempt in range(repeats + 1):  # the first run warms up (allocations, kernels)
            x = pair.clone().requires_grad_(with_backward)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            y = denoise.cancel(x, method)
            if with_backward:
                y.square().sum().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if attempt:
                best = min(best, time.perf_counter() - start)
        return 1000.0 * best / batch

    rows = []
    for method, canceller in denoise.CANCELLERS.items():
        with torch.set_grad_enabled(False):
            row = {"canceller": method, "what": canceller.summary, "ms/clip": run(method, False)}
        if backward:
            row["ms/clip fwd+bwd"] = run(method, True)
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None, prog: str = "python -m kit.tools.bench_denoise") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = time_cancellers(args.batch, args.seconds, args.repeats, args.device, args.backward)
    print(
        f"cancellers, batch {args.batch} x {args.seconds:g} s stereo clips, {args.device}, "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.1f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
