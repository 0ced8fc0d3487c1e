# The set-up scripts/test.sh and scripts/demo.sh share; sourced from the repository root after
# `ZV_NAME=<script>` (the prefix of its messages). Defines functions only; nothing here runs sudo,
# apt-get or any system package manager: what the system lacks is named, with its install command.
#   zv_platform      Linux, else a one-line refusal (ZOOMVIT_ANY_OS=1 tries anyway)
#   zv_prereqs [PORT] what the long part will need, checked in its first seconds: a C++ compiler and
#                    the Python headers (DeepSpeed JIT-builds its CPU op in the first training worker;
#                    not needed once built), disk space for the install (when torch is not installed
#                    yet), and, given PORT, that MLflow can serve there (free, or MLflow already on it);
#                    each missing piece named with its Debian/Ubuntu and Fedora install command
#   zv_venv          the active virtual environment ($VIRTUAL_ENV), else .venv in the checkout, created
#                    when absent from the first Python >= 3.11 found ($PYTHON, else python3, python3.14 ..
#                    python3.11); activated for the rest of the script (PATH), its python in $ZV_PY;
#                    torch's JIT extensions (DeepSpeed's CPU op) built inside it, not in a cache every
#                    environment shares and rebuilds ($TORCH_EXTENSIONS_DIR, unless already set)
#   zv_install [X]   pip install -e '.[X]' into it when scripts/_missing_deps.py finds anything of
#                    pyproject.toml's dependencies (and extra X) missing or out of range
#   zv_http_ok URL [S]  whether URL answers 200 within S seconds (Python's urllib: no curl needed)
ZV_NAME="${ZV_NAME:-setup}"
ZV_ROOT="${ZV_ROOT:-$PWD}"
ZV_MIN_PYTHON=3.11

zv_say() { echo "[$ZV_NAME] $*"; }
zv_die() { echo "[$ZV_NAME] $*" >&2; exit 1; }

zv_py_version() {  # PYTHON -> 3.11.7; fails when it does not run
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
}

zv_version_ok() {  # 3.11.7 -> whether it is >= $ZV_MIN_PYTHON
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
  (( major > ${ZV_MIN_PYTHON%%.*} || (major == ${ZV_MIN_PYTHON%%.*} && minor >= ${ZV_MIN_PYTHON#*.}) ))
}

zv_base_python() {  # prints the path of the Python that creates .venv
  local candidates found="" c path v
  if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); else candidates=(python3 python3.14 python3.13 python3.12 python3.11); fi
  for c in "${candidates[@]}"; do
    path=$(command -v "$c" 2>/dev/null) || continue
    v=$(zv_py_version "$path") || { found+=" $path (does not run);"; continue; }
    if zv_version_ok "$v"; then echo "$path"; return 0; fi
    found+=" $path is Python $v;"
  done
  zv_die "ZoomViT needs Python >= $ZV_MIN_PYTHON to create .venv, and found none:${found:- no ${candidates[*]} on PATH}" \
    "Install Python $ZV_MIN_PYTHON or newer (or name it: PYTHON=/path/to/python3.12), or activate a virtual environment that has it."
}

zv_venv() {
  local venv how v base short
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    venv="$VIRTUAL_ENV" how="the active virtual environment"
    [ -x "$venv/bin/python" ] || zv_die "VIRTUAL_ENV=$venv is set but has no bin/python: deactivate it (or recreate it) and run again."
  else
    venv="$ZV_ROOT/.venv" how="the checkout's virtual environment"
    if [ ! -x "$venv/bin/python" ]; then
      base=$(zv_base_python) || exit 1
      short=$(zv_py_version "$base"); short=${short%.*}
      zv_say "no virtual environment active: creating $venv with $base (Python $short)"
      if ! "$base" -m venv "$venv"; then
        rm -rf "$venv"  # half made (no pip): this script created it
        zv_die "could not create $venv with '$base -m venv' (see above): install Python's venv module" \
          "(Debian/Ubuntu: sudo apt-get install python$short-venv; Fedora: part of python3), or activate a" \
          "virtual environment, and run again."
      fi
      how="a new virtual environment"
    fi
  fi
  v=$(zv_py_version "$venv/bin/python") || zv_die "$venv/bin/python does not run: remove $venv (or deactivate it) and run again."
  zv_version_ok "$v" || zv_die "$venv has Python $v; ZoomViT needs Python >= $ZV_MIN_PYTHON." \
    "$([ "$venv" = "$ZV_ROOT/.venv" ] && echo "Remove $venv and run again (PYTHON=/path/to/python3.12 picks the interpreter)" || echo "Deactivate it")."
  export VIRTUAL_ENV="$venv"
  export PATH="$venv/bin:$PATH"
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
  unset PYTHONHOME
  ZV_PY="$venv/bin/python"
  zv_say "using $how: $venv (Python $v)"
}

zv_install() {  # [EXTRA]: install the package (with that extra) into $VIRTUAL_ENV when anything is missing
  local extra="${1:-}" target="." missing
  [ -z "$extra" ] || target=".[$extra]"
  missing=$("$ZV_PY" "$ZV_ROOT/scripts/_missing_deps.py" "$ZV_ROOT" --extra "$extra") || zv_die "could not check the installed packages (see above)"
  if [ -z "$missing" ]; then
    zv_say "installed: the package${extra:+ and its $extra extra} (pyproject.toml)"
    return 0
  fi
  zv_say "missing or out of range in $VIRTUAL_ENV:"
  sed 's/^/    /' <<<"$missing"
  "$ZV_PY" -m pip --version >/dev/null 2>&1 || zv_die "$VIRTUAL_ENV has no pip: remove it (or run '$ZV_PY -m ensurepip') and run again."
  if grep -q '^torch[^a-z_]' <<<"$missing" && ! command -v nvidia-smi >/dev/null 2>&1; then
    case "${PIP_INDEX_URL:-} ${PIP_EXTRA_INDEX_URL:-}" in
      *download.pytorch.org/whl/cpu*) ;;
      *) zv_say "torch from PyPI is its CUDA build (~7 GB with its libraries) and this machine shows no NVIDIA" \
           "GPU (no nvidia-smi): PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu installs the CPU-only build" \
           "(~1 GB) instead; stop now (Ctrl-C) to rerun with it, or let this one go on" ;;
    esac
  fi
  zv_say "installing: pip install -e '$target'"
  "$ZV_PY" -m pip install --quiet --upgrade pip || zv_say "(pip could not upgrade itself; going on with the one there)"
  "$ZV_PY" -m pip install --quiet -e "$target" || zv_die "pip install -e '$target' failed (see above)."
  missing=$("$ZV_PY" "$ZV_ROOT/scripts/_missing_deps.py" "$ZV_ROOT" --extra "$extra")
  [ -z "$missing" ] || zv_die "still missing after pip install -e '$target':"$'\n'"$missing"
}

zv_http_ok() {  # URL [SECONDS]: whether URL answers 200 within SECONDS (default: one try); no proxy
  "${ZV_PY:-python3}" - "$1" "${2:-0}" <<'PY'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url, timeout=min(3, max(1, deadline - time.monotonic()))) as response:
            if response.status == 200:
                sys.exit(0)
    except Exception:
        pass
    if time.monotonic() >= deadline:
        sys.exit(1)
    time.sleep(0.5)
PY
}

zv_platform() {
  local os
  os=$(uname -s)
  [ "$os" = Linux ] && return 0
  if [ "${ZOOMVIT_ANY_OS:-}" = 1 ]; then
    zv_say "$os is not a supported system (Linux is); going on, as ZOOMVIT_ANY_OS=1 asks"
    return 0
  fi
  zv_die "this needs Linux (tested on Debian 12), and this machine runs $os. On macOS," \
    "run it in a Linux container or VM (e.g. docker run -it python:3.12 bash, then git clone and run" \
    "it there). ZOOMVIT_ANY_OS=1 tries anyway."
}

zv_prereqs() {  # [MLFLOW_PORT]
  local venv py v short inc ext free need missing=() port="${1:-}"
  venv="${VIRTUAL_ENV:-$ZV_ROOT/.venv}"
  if zv_py_version "$venv/bin/python" >/dev/null; then py="$venv/bin/python"; else py=$(zv_base_python) || exit 1; fi
  v=$(zv_py_version "$py"); short=${v%.*}
  # DeepSpeed's shared-memory op, JIT-built with torch's extension loader by the first training worker
  ext="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}/deepspeed_shm_comm/deepspeed_shm_comm.so"
  if [ ! -f "$ext" ]; then
    if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
      missing+=("a C++ compiler ('${CXX:-c++}'; DeepSpeed builds its CPU op with it): Debian/Ubuntu: sudo apt-get install g++; Fedora: sudo dnf install gcc-c++")
    else
      inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
      if ! printf '#include <Python.h>\nint main() { return 0; }\n' |
          "${CXX:-c++}" -fsyntax-only -fopenmp -x c++ -I"$inc" - >/dev/null 2>&1; then
        missing+=("the Python $short headers (Python.h in $inc) or OpenMP for '${CXX:-c++}' (DeepSpeed builds its CPU op with them): Debian/Ubuntu: sudo apt-get install python$short-dev g++; Fedora: sudo dnf install python$short-devel gcc-c++")
      fi
    fi
  fi
  # the install: torch from PyPI brings its CUDA libraries (~7 GB installed, plus pip's download)
  if ! compgen -G "$venv/lib/python*/site-packages/torch/__init__.py" >/dev/null; then
    need=10
    case "${PIP_INDEX_URL:-} ${PIP_EXTRA_INDEX_URL:-}" in *download.pytorch.org/whl/cpu*) need=3 ;; esac
    need=${ZOOMVIT_INSTALL_GB:-$need}
    free=$(df -Pk "$(dirname "$venv")" | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ -n "$free" ] && [ "$free" -lt "$need" ]; then
      missing+=("disk space: the install needs about $need GB free in $(dirname "$venv"), which has $free GB (free some, or where there is no GPU install torch's CPU-only build, ~3 GB: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)")
    fi
  fi
  if [ -n "$port" ] && ! ZV_PY="$py" zv_http_ok "http://127.0.0.1:$port/health"; then
    if ! "$py" - "$port" <<'PY'
import errno, socket, sys
port = int(sys.argv[1])
with socket.socket() as s:  # something answers there: another program holds the port
    s.settimeout(1)
    if s.connect_ex(("127.0.0.1", port)) == 0:
        sys.exit(1)
with socket.socket() as s:  # as the server will bind: SO_REUSEADDR, on loopback
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as e:
        sys.exit(1 if e.errno == errno.EADDRINUSE else 0)
PY
    then
      missing+=("a free port for MLflow: $port on 127.0.0.1 is taken by another program (on macOS the AirPlay receiver holds 5000): run again with MLFLOW_PORT=5001, or any free port")
    fi
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  {
    echo "[$ZV_NAME] missing, before anything is installed or run:"
    printf '  - %s\n' "${missing[@]}"
  } >&2
  exit 1
}
