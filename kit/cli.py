"""``dcase-kit``: one command for the toolkit, with a subcommand per tool.

    dcase-kit run [RECIPE] [options]     the notebooks for a recipe (the same as ./run_all.sh)
    dcase-kit metrics SCORES_DIR         official metrics of official-format score files
    dcase-kit COMMAND --help             the options and examples of one command

Each subcommand hands its arguments to the ``main(argv, prog)`` of one module (a library module
``kit.X`` or a tool ``kit.tools.X``), so ``python -m`` that module keeps working with the same
options; modules are imported only when their command runs, so a command whose module or packages
are missing says so without breaking the others. Installed by
``pip install -e .`` (``[project.scripts]`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from dataclasses import dataclass

PROG = "dcase-kit"


@dataclass(frozen=True)
class Command:
    module: str  # the module whose main(argv) runs the command
    summary: str
    examples: tuple[str, ...] = ()  # shown after the module's --help (modules without their own)
    prefix: tuple[str, ...] = ()  # arguments put before the user's (a subcommand of the module)


COMMANDS = {
    "run": Command("kit.pipeline", "run the notebooks for a recipe (the same as ./run_all.sh)"),
    "list": Command("kit.pipeline", "the recipes of notebooks/recipes/ and what each one is"),
    "metrics": Command("kit.metrics", "official metrics of official-format score files"),
    "validate": Command(
        "kit.submission",
        "check a submission folder, system folder or zip against the official format",
        (
            "validate submissions/embedded_default.zip",
            "validate runs/RUN/submission/Smith_UNI_task2_1 --test-dir data/dcase2026/eval_data/raw",
        ),
        prefix=("validate",),
    ),
    "zip": Command(
        "kit.submission",
        "zip a validated submission folder (and the technical report)",
        (
            "zip runs/RUN/submission submissions/Smith_UNI_task2.zip --report Smith_UNI_task2.technical_report.pdf",
        ),
        prefix=("zip",),
    ),
    "download": Command(
        "kit.download",
        "download the official archives from Zenodo and unpack them (resumable, verified)",
        ("download data/dcase2026", "download data/dcase2026 --dev --eval-train --eval-test --keep-zips"),
    ),
    "checkpoints": Command(
        "kit.checkpoints",
        "where each official backbone checkpoint comes from; `checkpoints fetch NAME DIR` downloads it",
    ),
    "synth": Command(
        "kit.synth",
        "generate the embedded DCASE-2026-style dataset (synthetic machines, near/far stereo)",
        ("synth data/embedded", "synth /tmp/tiny --scale 0.25 --machines SynFan SynValve"),
    ),
    "mix": Command(
        "kit.mix",
        "semi-real near/far stereo clips from real mono recordings and real noise recordings",
        (
            "mix data/dcase2023 data/noise data/semireal",
            "mix data/dcase2023 data/noise data/semireal --near-snr-db 0,10",
        ),
    ),
    "train": Command(
        "kit.train",
        "fine-tune one backbone from a YAML config (run under torchrun for several GPUs)",
        ("train config.yaml --index runs/RUN/index.csv --run-dir runs/RUN",),
    ),
    # tools (kit/tools/): checks and benchmarks beside the library
    "synth-check": Command(
        "kit.tools.synth_check",
        "calibration of a generated dataset (1-NN on log-mel statistics)",
        ("synth-check data/embedded", "synth-check data/embedded --channels near --metric euclidean"),
    ),
    "benchmark": Command(
        "kit.tools.benchmark",
        "quality benchmark: one recipe over several seeds on a dataset (mean and spread table)",
        (
            "benchmark data/dcase2023_toycar --name toycar",
            "benchmark embedded --recipe default",
            "benchmark --tables runs/benchmark/toycar",
        ),
    ),
    "bench": Command(
        "kit.tools.bench",
        "backbone, data loader and training speed and memory benchmarks (prints a table)",
        (
            "bench backbones",
            "bench backbones --device cuda --batch 16 --backbones beats eat",
            "bench loader",
            "bench train --steps 5",
        ),
    ),
    "bench-scoring": Command(
        "kit.tools.bench_scoring",
        "scoring backends and fusion benchmark (prints a table)",
        ("bench-scoring", "bench-scoring --blas-threads 1 --repeats 3"),
    ),
    "bench-denoise": Command(
        "kit.tools.bench_denoise",
        "far-channel canceller benchmark: milliseconds per clip (prints a table)",
        ("bench-denoise", "bench-denoise --device cuda --batch 16 --backward"),
    ),
    "domain-options": Command(
        "kit.tools.domain_options",
        "target-domain options (references, SMOTE, normalisation) on a run's embeddings (prints a table)",
        ("domain-options runs/benchmark/toycar/seed-0 runs/benchmark/toycar/seed-1 --branches cnn logmel",),
    ),
}

_MAIN_EXAMPLES = (
    "run                                  # the embedded default, notebooks 01-10",
    "run audiocc_1 --only 01,02           # two notebooks of a report recipe",
    "list                                 # the recipes",
    "metrics runs/RUN/dev_scores          # development results of every system of a run",
    "validate submissions/embedded_default.zip",
)


def _top_help() -> str:
    width = max(map(len, COMMANDS)) + 2
    commands = "\n".join(f"  {name:{width}s}{command.summary}" for name, command in COMMANDS.items())
    examples = "\n".join(f"  {PROG} {example}" for example in _MAIN_EXAMPLES)
    return (
        f"usage: {PROG} COMMAND [options]\n\n"
        "DCASE 2026 Task 2 toolkit: the notebook pipeline, official metrics, submissions and data.\n\n"
        f"commands:\n{commands}\n\n"
        f"examples:\n{examples}\n\n"
        f"`{PROG} COMMAND --help` shows a command's options and examples; every command is also\n"
        "`python -m MODULE` (synth: `python -m kit.synth`, bench: `python -m kit.tools.bench`;\n"
        "run: `python -m kit.pipeline` or ./run_all.sh).\n"
    )


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dcase2026-asd-kit")
    except metadata.PackageNotFoundError:
        return "not installed (run from a checkout)"


def _list_recipes(argv: list[str]) -> int:
    from kit import pipeline

    parser = argparse.ArgumentParser(
        prog=f"{PROG} list",
        description="The recipes of notebooks/recipes/: name and description (run one: dcase-kit run NAME).",
        epilog=f"examples:\n  {PROG} list\n  {PROG} list --names    # one name a line, for scripts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--names", action="store_true", help="only the names, one a line")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error
        return exit_.code
    try:
        print("\n".join(pipeline.recipe_names()) if args.names else pipeline.describe_recipes())
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _import(name: str, command: Command):
    """The command's module, or None after a message saying what is missing."""
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as error:
        if error.name == command.module:
            print(
                f"error: `{PROG} {name}` needs {command.module} ({command.module.replace('.', '/')}.py), "
                "which this checkout does not have yet; update the checkout",
                file=sys.stderr,
            )
        else:
            print(
                f"error: `{PROG} {name}` needs the Python package {error.name!r}, which is not "
                "installed: pip install -r requirements.txt",
                file=sys.stderr,
            )
        return None


def _call_main(module, argv: list[str], prog: str) -> int:
    """``module.main(argv, prog=prog)``: every command module's main takes both."""
    try:
        result = module.main(argv, prog=prog)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        result = exit_.code
    if result is None:
        return 0
    if isinstance(result, int):
        return result
    print(result, file=sys.stderr)  # sys.exit("message")
    return 1


def _wants_help(argv: list[str]) -> bool:
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "-h" in options or "--help" in options


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[0] == "help":
            return main([argv[1], "--help"])
        print(_top_help(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{PROG} {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(
            f"error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)} ({PROG} --help)",
            file=sys.stderr,
        )
        return 2
    if name == "list":
        return _list_recipes(rest)
    command = COMMANDS[name]
    module = _import(name, command)
    if module is None:
        return 2
    # a module with subcommands of its own (kit.submission) names them after the program itself
    prog = PROG if command.prefix else f"{PROG} {name}"
    code = _call_main(module, [*command.prefix, *rest], prog)
    if command.examples and _wants_help(rest) and code == 0:
        print("\nexamples:")
        for example in command.examples:
            print(f"  {PROG} {example}")
    return code


if __name__ == "__main__":
    sys.exit(main())
