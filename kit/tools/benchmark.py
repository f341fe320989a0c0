"""The quality benchmark: one recipe run over several seeds on a dataset, and one table.

    python -m kit.tools.benchmark DATA_ROOT --name toycar            # seeds 0 1 2, the benchmark recipe
    python -m kit.tools.benchmark embedded --name embedded --seeds 0 1 2 --recipe benchmark
    python -m kit.tools.benchmark --tables runs/benchmark/toycar     # the tables of finished runs again

Each seed is one ordinary run of the recipe (``kit.pipeline.run_recipe``) in
``<out>/seed-<S>/`` with every seed setting of the recipe set to S (the fine-tuning notebooks'
``training.seed``, the autoencoder's ``baseline_seed``, the fusion search's ``seed``); a seed whose
``results.csv`` exists is not run again, so an interrupted benchmark resumes. The table gives every
system's official score (and AUC source / target, pAUC) as the mean and the sample standard deviation
over the seeds (with the smallest and largest), from the runs' own ``results.csv``; written to
``<out>/benchmark.csv`` and ``<out>/benchmark.md``.

The Bayesian fusion (``fusion``) is fitted on the development labels it is scored on: read it beside
``fusion-heldout`` (every clip fused with weights searched without its labels) and the label-free
``fusion-mean``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from kit import pipeline
from kit.files import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
SEED_SETTINGS = {  # notebook prefix -> the parameter (path) that takes the seed
    "02": "training.seed",
    "03": "training.seed",
    "04": "training.seed",
    "05": "training.seed",
    "06": "training.seed",
    "07": "training.seed",
    "09": "baseline_seed",
    "10": "seed",
}
METRICS = ("hmean", "auc_source", "auc_target", "pauc")


def seed_overrides(recipe: str, seed: int) -> list[str]:
    """``--set`` overrides that give every seeded step of ``recipe`` the seed ``seed``."""
    notebooks = {step["notebook"][:2] for step in pipeline.load_recipe(recipe)["steps"]}
    return [f"{nb}.{setting}={seed}" for nb, setting in SEED_SETTINGS.items() if nb in notebooks]


def run_seeds(
    recipe: str,
    data_root: str,
    out: Path,
    seeds: list[int],
    overrides: list[str] = (),
    kernel: str | None = None,
) -> list[Path]:
    """One run per seed under ``out/seed-<S>``; finished seeds are kept as they are."""
    runs = []
    for seed in seeds:
        run_dir = out / f"seed-{seed}"
        if not (run_dir / "results.csv").exists():
            start = time.time()
            pipeline.run_recipe(
                recipe,
                data_root,
                run_dir,
                overrides=[*seed_overrides(recipe, seed), *overrides],
                kernel=kernel,
            )
            print(f"[benchmark] seed {seed}: {time.time() - start:.0f} s", flush=True)
        runs.append(run_dir)
    return runs


def summarise(runs: list[Path]) -> pd.DataFrame:
    """Mean, standard deviation, min and max over the runs of every system's overall metrics."""
    frames = []
    for run_dir in runs:
        results = pd.read_csv(run_dir / "results.csv")
        overall = results[results["machine"] == "overall"][["system", *METRICS]]
        frames.append(overall.assign(run=run_dir.name))
    table = pd.concat(frames, ignore_index=True)
    grouped = table.groupby("system")
    summary = grouped[list(METRICS)].mean().add_suffix("_mean")
    summary["hmean_std"] = grouped["hmean"].std(ddof=1).fillna(0.0)
    summary["hmean_min"] = grouped["hmean"].min()
    summary["hmean_max"] = grouped["hmean"].max()
    summary["runs"] = grouped.size()
    return summary.sort_values("hmean_mean", ascending=False).reset_index()


def to_markdown(summary: pd.DataFrame) -> str:
    lines = [
        "| system | official score | min - max | AUC(source) | AUC(target) | pAUC | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        lines.append(
            f"| {row.system} | {row.hmean_mean:.3f} ± {row.hmean_std:.3f} | {row.hmean_min:.3f} - "
            f"{row.hmean_max:.3f} | {row.auc_source_mean:.3f} | {row.auc_target_mean:.3f} | "
            f"{row.pauc_mean:.3f} | {row.runs} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(out: Path, runs: list[Path]) -> pd.DataFrame:
    summary = summarise(runs)
    write_text_atomic(out / "benchmark.csv", summary.to_csv(index=False))
    write_text_atomic(out / "benchmark.md", to_markdown(summary))
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m kit.tools.benchmark") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", nargs="?", help="dataset root in the official layout, or 'embedded'")
    parser.add_argument(
        "--name", help="benchmark folder name under runs/benchmark (default: the data root's name)"
    )
    parser.add_argument("--recipe", default="benchmark", help="recipe name or YAML path (default: benchmark)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="benchmark folder (default: runs/benchmark/<name>)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NB.PARAM=VALUE", help="as in ./run_all.sh"
    )
    parser.add_argument(
        "--tables", type=Path, metavar="FOLDER", help="only rebuild the tables of a benchmark folder"
    )
    parser.add_argument("--kernel", default=None)
    args = parser.parse_args(argv)
    try:
        if args.tables:
            runs = sorted(p for p in args.tables.glob("seed-*") if (p / "results.csv").exists())
            if not runs:
                raise FileNotFoundError(f"no finished runs (seed-*/results.csv) in {args.tables}")
            out = args.tables
        else:
            if not args.data_root:
                parser.error("give a DATA_ROOT (or --tables FOLDER)")
            name = args.name or Path(args.data_root).name
            out = args.out or REPO / "runs" / "benchmark" / name
            runs = run_seeds(args.recipe, args.data_root, out.absolute(), args.seeds, args.set, args.kernel)
        summary = write_tables(out, runs)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(to_markdown(summary))
    print(f"tables: {out / 'benchmark.md'}, {out / 'benchmark.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
