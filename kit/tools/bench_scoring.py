"""Benchmark of the scoring backends: ``python -m kit.tools.bench_scoring`` (``dcase-kit bench-scoring``).

Scores a development-sized problem (7 machines x 1,000 normal training embeddings, 990 source and 10
target, plus 200 test embeddings, 768 dimensions, near channel) with each backend configuration and
prints the wall time of each. Training clips are scored too (leave-one-out), as the pipeline does,
so every configuration scores 1,200 clips per machine. BEAM + VarMin (and plain BEAM) run on
per-band embeddings [N, F, D] of the same clips, by default F = 8 bands of ``--dims`` and F = 4 of
half as many (``--beam-shapes 8x768 4x384``). Each row gives the best wall time and the peak memory
the scoring allocated (tracemalloc, one more run). Then it times a fusion-weight search
(``kit.fusion.search_weights``) over 8 branches of those clips with the default budget.

``--blas-threads N`` caps the BLAS thread pool (threadpoolctl). On a shared, oversubscribed CPU a
multi-threaded OpenBLAS Cholesky can be ten times slower than a single-threaded one, so both
settings are worth a look.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from kit.fusion import search_weights
from kit.scoring import score_embeddings

CONFIGURATIONS = [
    ("knn", dict(backend="knn", k=1)),
    ("knn", dict(backend="knn", k=1, separate_domains=True, smote=100)),
    ("mahalanobis", dict(backend="mahalanobis")),
    ("mahalanobis", dict(backend="mahalanobis", separate_domains=True)),
]
BEAM_CONFIGURATIONS = [
    ("beam", dict(backend="beam")),  # VarMin on
    ("beam", dict(backend="beam", varmin=False)),
]


def synthetic_embeddings(
    machines: int = 7,
    n_source: int = 990,
    n_target: int = 10,
    n_test: int = 200,
    dims: int = 768,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Random embeddings and their meta in the embedding contract (near channel only)."""
    rng = np.random.default_rng(seed)
    domains = ["source"] * n_source + ["target"] * n_target + ["source", "target"] * (n_test // 2)
    splits = ["train"] * (n_source + n_target) + ["test"] * n_test
    labels = ["normal"] * (n_source + n_target) + ["normal", "normal", "anomaly", "anomaly"] * (n_test // 4)
    per_machine = pd.DataFrame({"split": splits, "domain": domains, "label": labels})
    per_machine["file_name"] = [f"clip_{i:05d}.wav" for i in range(len(per_machine))]
    meta = pd.concat(
        [per_machine.assign(machine=f"machine{m}") for m in range(machines)], ignore_index=True
    ).assign(dataset="dev", section="00", channel="near")
    emb = rng.normal(size=(len(meta), dims)).astype(np.float32)
    return meta, emb


def _measure(meta: pd.DataFrame, emb: np.ndarray, options: dict, repeats: int) -> tuple[float, float, int]:
    """Best wall time over ``repeats`` scorings, then one more scoring's peak allocated MiB
    (tracemalloc: numpy reports its arrays to it), and the number of clips scored."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        scores = score_embeddings(meta, emb, progress=False, **options)
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    try:
        score_embeddings(meta, emb, progress=False, **options)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return best, peak, len(scores)


def run(
    machines: int = 7, dims: int = 768, repeats: int = 1, beam_shapes: list[tuple[int, int]] | None = None
) -> pd.DataFrame:
    """One row per configuration: seconds and peak MiB. ``beam_shapes``: (bands, dims) of the per-band
    embeddings BEAM runs on (default (8, dims) and (4, dims // 2))."""
    if beam_shapes is None:
        beam_shapes = [(8, dims), (4, max(1, dims // 2))]
    runs = [(None, dims, CONFIGURATIONS)] + [
        (bands, width, BEAM_CONFIGURATIONS) for bands, width in beam_shapes
    ]
    rows = []
    for bands, width, configurations in runs:
        meta, emb = synthetic_embeddings(machines=machines, dims=width * (bands or 1))
        if bands:
            emb = emb.reshape(len(emb), bands, width)
        for backend, options in configurations:
            seconds, peak, clips = _measure(meta, emb, options, repeats)
            described = ", ".join(f"{key}={value}" for key, value in options.items() if key != "backend")
            rows.append(
                {
                    "backend": backend,
                    "embeddings": f"{bands} x {width}" if bands else f"{width}",
                    "options": described,
                    "clips scored": clips,
                    "seconds": seconds,
                    "peak MiB": peak,
                }
            )
    return pd.DataFrame(rows)


def time_fusion(
    n_branches: int = 8, machines: int = 7, n_iter: int = 40, init_points: int = 10
) -> pd.DataFrame:
    """Seconds for a weight search over ``n_branches`` noisy copies of one informative score."""
    meta, _ = synthetic_embeddings(machines=machines, dims=1)
    rng = np.random.default_rng(1)
    anomalous = (meta["label"] == "anomaly").to_numpy()
    branches = {
        f"branch{b}": meta.assign(score=rng.normal(size=len(meta)) + rng.uniform(0, 2) * anomalous)
        for b in range(n_branches)
    }
    start = time.perf_counter()
    _, best, history = search_weights(branches, n_iter=n_iter, init_points=init_points, progress=False)
    seconds = time.perf_counter() - start
    return pd.DataFrame(
        [
            {
                "branches": n_branches,
                "evaluations": len(history),
                "best official score": best,
                "seconds": seconds,
            }
        ]
    )


def _shape(text: str) -> tuple[int, int]:
    try:
        bands, dims = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BANDSxDIMS such as 8x768, got {text!r}") from None
    if bands < 1 or dims < 1:
        raise argparse.ArgumentTypeError(f"bands and dims must be positive, got {text!r}")
    return bands, dims


def main(argv: list[str] | None = None, prog: str = "python -m kit.tools.bench_scoring") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=7)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=1, help="report the best of this many runs")
    parser.add_argument(
        "--blas-threads", type=int, default=None, help="cap the BLAS threads (default: no cap)"
    )
    parser.add_argument(
        "--fusion-branches", type=int, default=8, help="branches of the fusion search (0: skip)"
    )
    parser.add_argument(
        "--beam-shapes",
        nargs="*",
        type=_shape,
        default=None,
        metavar="FxD",
        help="per-band embedding shapes for BEAM, e.g. 8x768 4x384 (default: 8x<dims> 4x<dims/2>; none: skip)",
    )
    args = parser.parse_args(argv)
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        table = run(args.machines, args.dims, args.repeats, args.beam_shapes)
        fusion = time_fusion(args.fusion_branches, args.machines) if args.fusion_branches else None
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    per_backend = table.groupby("backend", sort=False)["seconds"].sum()
    print()
    for backend, seconds in per_backend.items():
        print(f"{backend:>12}: {seconds:.2f} s")
    print(f"{'total':>12}: {table['seconds'].sum():.2f} s")
    if fusion is not None:
        print()
        print(fusion.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
