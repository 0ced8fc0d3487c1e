#!/usr/bin/env bash
# The test command: sets itself up on a fresh machine, then runs the suite.
#   bash scripts/test.sh                 # the whole suite (what CI runs)
#   bash scripts/test.sh -m "not slow"   # the fast tier: no Ray / DeepSpeed / MLflow end-to-end runs
#   bash scripts/test.sh tests/test_decode.py -k label   # any pytest arguments
# Installs the package with its dev extra when any of it is missing, and Debian's Chromium for the
# browser test when /usr/bin/chromium is absent (Playwright drives it; nothing downloads a browser).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 - <<'PY' 2>/dev/null
import importlib.metadata as md, pathlib, sys
import zoomvit, pytest, pytest_timeout, playwright, moto.server, s3fs  # noqa: F401
md.version("ruff")
# an editable install of *this* checkout, not another one
sys.exit(0 if pathlib.Path(zoomvit.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve() else 1)
PY
then
  echo "[test.sh] installing the package and its dev extra (pip install -e '.[dev]')"
  python3 -m pip install --quiet --upgrade pip
  python3 -m pip install --quiet -e ".[dev]"
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "[test.sh] installing Debian's chromium for the browser test"
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium >/dev/null
fi

exec python3 -m pytest -q "$@"
