#!/usr/bin/env bash
# Run the numbered notebooks in order with papermill:  ./run_all.sh [RECIPE] [options]
#   ./run_all.sh                  the embedded default (generated data; the pretrained EfficientAT mn04
#                                 fine-tuned and frozen, a CNN, log-mel statistics, the autoencoder;
#                                 scored, fused, submitted)
#   ./run_all.sh audiocc_1 --only 01,02     ./run_all.sh --set 02.steps=50     ./run_all.sh --list
# Options and environment variables (DATA_ROOT, RUN_DIR, BEATS_CHECKPOINT, ...): ./run_all.sh --help.
# The same command as `dcase-kit run` and `python -m kit.pipeline`: every option is parsed there.
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python
else py=python3
fi
# Relative paths (DATA_ROOT, RUN_DIR, --run-dir) stay relative to where the command was typed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -c 'import sys; from kit.pipeline import main; sys.exit(main(sys.argv[1:], prog="./run_all.sh"))' "$@"
