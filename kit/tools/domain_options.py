"""Target-domain options side by side: the same embeddings scored with each reference/normalisation choice.

    python -m kit.tools.domain_options RUN_DIR [RUN_DIR ...] [--branches cnn logmel] [--channel near]

Reads the cached embeddings of finished runs (e.g. the seeds of ``python -m kit.tools.benchmark``) and
scores each branch's ``--channel`` with every option of :data:`OPTIONS` (pooled or separate source and
target references, SMOTE target points, per-domain score normalisation, local density), then prints the
official score, AUC source and AUC target on the development test clips as the mean and the sample
standard deviation over the runs. Scoring only: nothing is trained, so a table over three seed runs
takes seconds. The options' choice is a setting of ``09_scoring`` (``separate_domains``, ``smote``,
``normalisation``): read this table on the data you tune on, not on the labels you report.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from kit import embed, manifest, metrics, scoring

METRICS = ("hmean", "auc_source", "auc_target")
# label -> (backend, score_embeddings options)
OPTIONS = {
    "knn pooled": ("knn", {"separate_domains": False}),
    "knn separate": ("knn", {"separate_domains": True}),
    "knn separate + smote 30": ("knn", {"separate_domains": True, "smote": 30}),
    "knn separate + domain_mean": ("knn", {"separate_domains": True, "normalisation": "domain_mean"}),
    "knn pooled + local_density": ("knn", {"separate_domains": False, "normalisation": "local_density"}),
    "mahalanobis pooled": ("mahalanobis", {"separate_domains": False}),
    "mahalanobis separate": ("mahalanobis", {"separate_domains": True}),
    "mahalanobis separate + domain_mean": (
        "mahalanobis",
        {"separate_domains": True, "normalisation": "domain_mean"},
    ),
    "mahalanobis separate + domain_zscore": (
        "mahalanobis",
        {"separate_domains": True, "normalisation": "domain_zscore"},
    ),
}


def score_options(items: pd.DataFrame, emb, branch: str, channel: str = "near") -> pd.DataFrame:
    """One row per option: the official metrics of the embeddings' ``channel`` (development test clips)."""
    rows = []
    for label, (backend, options) in OPTIONS.items():
        try:
            scores = scoring.score_embeddings(
                items, emb, backend=backend, channel_policy=channel, k=1, progress=False, **options
            )
        except scoring.DegenerateScoresError as error:
            warnings.warn(f"{branch} {label} left out: {error}", stacklevel=2)
            continue
        dev = scores[(scores["dataset"] == "dev") & (scores["split"] == "test")]
        overall = metrics.results_table({label: dev}).query("machine == 'overall'").iloc[0]
        rows.append({"branch": branch, "option": label, **{m: overall[m] for m in METRICS}})
    return pd.DataFrame(rows)


def summarise(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Mean and sample standard deviation over the runs, per branch and option (in ``OPTIONS`` order)."""
    every = pd.concat(tables, ignore_index=True)
    grouped = every.groupby(["branch", "option"], sort=False)[list(METRICS)]
    out = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_sd"))
    out["runs"] = grouped.size()
    return out.reset_index()


def to_markdown(summary: pd.DataFrame) -> str:
    lines = [
        "| branch | option | official score | AUC source | AUC target | runs |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in summary.iterrows():
        cells = [
            f"{r[m + '_mean']:.3f}" + (f" ± {r[m + '_sd']:.3f}" if r["runs"] > 1 else "") for m in METRICS
        ]
        lines.append(f"| {r['branch']} | {r['option']} | " + " | ".join(cells) + f" | {r['runs']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m kit.tools.domain_options") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run folders (one per seed)")
    parser.add_argument("--branches", nargs="+", default=["cnn", "logmel"])
    parser.add_argument("--channel", default="near", help="channel policy scored (default: near)")
    args = parser.parse_args(argv)
    try:
        tables = [
            score_options(*embed.load(manifest.embedding_folder(run, branch)), branch, args.channel)
            for run in args.run_dirs
            for branch in args.branches
        ]
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        return 2
    print(to_markdown(summarise(tables)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
