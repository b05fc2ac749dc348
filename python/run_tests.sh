#!/usr/bin/env bash
# Runs the gqe_torch tests with Debian's Python (/usr/bin/python3, python3-torch, python3-numpy).
#
#   python/run_tests.sh PATH/TO/gqe-run PATH/TO/gqe-train
#
# gqe-run checks that saved models run in C++ to the same logits and expert choices; gqe-train
# makes a checkpoint that gqe_torch trains on. A missing torch is a failure, never a skip.
set -euo pipefail

if [[ $# -ne 2 || "$1" == -h || "$1" == --help ]]; then
  echo "usage: python/run_tests.sh PATH/TO/gqe-run PATH/TO/gqe-train" >&2
  exit 2
fi
for program in "$1" "$2"; do
  if [[ ! -x "$program" ]]; then
    echo "run_tests.sh: $program is not an executable; build gqe-run and gqe-train first" >&2
    exit 2
  fi
done
GQE_RUN=$(realpath "$1")
GQE_TRAIN=$(realpath "$2")
export GQE_RUN GQE_TRAIN

python=/usr/bin/python3
if ! "$python" -c 'import torch, numpy' 2>/dev/null; then
  echo "run_tests.sh: $python cannot import torch and numpy; install them with tools/install-deps.sh --python" >&2
  exit 1
fi
"$python" -c 'import sys, torch, numpy; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, numpy {numpy.__version__}")'

cd "$(dirname "${BASH_SOURCE[0]}")/tests"
start=$SECONDS
# No __pycache__ in the source tree.
PYTHONDONTWRITEBYTECODE=1 timeout 600 "$python" -m unittest discover --start-directory . --pattern 'test_*.py' -v
echo "python tests passed in $((SECONDS - start))s"
