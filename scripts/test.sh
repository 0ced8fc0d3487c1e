#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then runs the suite.
#   bash scripts/test.sh                 # the whole suite (what CI runs)
#   bash scripts/test.sh -m "not slow" -n 2 --dist loadfile   # the fast tier, on both cores (pytest-xdist):
#                                        # no Ray / DeepSpeed / MLflow end-to-end runs
#   bash scripts/test.sh tests/test_decode.py -k label   # any pytest arguments
# Set-up (scripts/_setup.sh): the active virtual environment, else .venv in the checkout (created from
# Python >= 3.11 when absent, so a system Python that refuses installs (PEP 668) is never touched);
# `pip install -e '.[dev]'` there when anything of pyproject.toml's dependencies or dev extra is missing
# or out of range; Debian's Chromium (apt-get, with sudo when not root) only when these arguments
# select the browser test, which skips itself where Chromium cannot be installed (Playwright drives
# it; nothing downloads a browser). ZOOMVIT_SETUP_ONLY=1 does the set-up for these arguments and stops
# before pytest (to prepare a machine or an image).
set -euo pipefail
cd "$(dirname "$0")/.."
ZV_NAME=test.sh
. scripts/_setup.sh

zv_venv
zv_install dev
zv_chromium "$@"
if [ "${ZOOMVIT_SETUP_ONLY:-}" = 1 ]; then
  zv_say "set up (ZOOMVIT_SETUP_ONLY=1): not running pytest"
  exit 0
fi
exec "$ZV_PY" -m pytest -q "$@"
