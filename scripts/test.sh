#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then runs the suite.
#   bash scripts/test.sh                 # the whole suite (what CI runs)
#   bash scripts/test.sh -m "not slow" -n 2 --dist loadfile   # the fast tier, on both cores (pytest-xdist):
#                                        # no Ray / DeepSpeed / MLflow end-to-end runs
#   bash scripts/test.sh -m browser      # the browser test (headless Chromium on the MLflow UI)
#   bash scripts/test.sh tests/test_decode.py -k label   # any pytest arguments
# Set-up (scripts/_setup.sh): Linux, and within its first seconds what the suite needs later (a C++
# compiler and the Python headers for DeepSpeed's CPU op, disk for the install), each missing piece
# named with its install command; the active virtual environment, else .venv in the checkout (created
# from Python >= 3.11 when absent, so a system Python that refuses installs (PEP 668) is never
# touched); `pip install -e '.[dev]'` there when anything of pyproject.toml's dependencies or dev extra
# is missing or out of range. Nothing runs sudo or a system package manager. The browser test uses
# whatever Chromium Playwright can launch (its own build, `python -m playwright install chromium`,
# else a system Chromium), and skips saying how to get one where there is none. ZOOMVIT_SETUP_ONLY=1
# does the set-up and stops before pytest (to prepare a machine or an image).
set -euo pipefail
cd "$(dirname "$0")/.."
ZV_NAME=test.sh
. scripts/_setup.sh

zv_platform
zv_prereqs
zv_venv
zv_install dev
if [ "${ZOOMVIT_SETUP_ONLY:-}" = 1 ]; then
  zv_say "set up (ZOOMVIT_SETUP_ONLY=1): not running pytest"
  exit 0
fi
exec "$ZV_PY" -m pytest -q "$@"
