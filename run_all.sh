#!/usr/bin/env bash
# Run the numbered notebooks in order with papermill.
#   ./run_all.sh                 the embedded default (generated data, all three backbones in their small
#                                CPU configurations, scored, fused, submitted)
#   ./run_all.sh SYSTEM [...]    one named system from notebooks/systems/ (audiocc_1 ... eat_asp_4)
# Environment: DATA_ROOT (dataset root in the official layout; default: the embedded dataset),
# RUN_DIR (run folder; default: a new folder under runs/), checkpoint variables such as
# BEATS_CHECKPOINT / EAT_CHECKPOINT / FISHER_CHECKPOINT used by the system files.
# Extra arguments go to `python -m kit.pipeline` (e.g. --set 02_finetune_beats.steps=50, --only 01,02).
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
system=${1:-default}
[ $# -gt 0 ] && shift
export DATA_ROOT=${DATA_ROOT:-embedded}
export RUN_DIR=${RUN_DIR:-runs/${system}-$(date +%Y%m%d-%H%M%S)}
exec "$py" -m kit.pipeline "$system" --data-root "$DATA_ROOT" --run-dir "$RUN_DIR" "$@"
