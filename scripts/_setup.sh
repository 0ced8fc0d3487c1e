# The set-up scripts/test.sh and scripts/demo.sh share; sourced from the repository root after
# `ZV_NAME=<script>` (the prefix of its messages). Defines functions only:
#   zv_venv          the active virtual environment ($VIRTUAL_ENV), else .venv in the checkout, created
#                    when absent from the first Python >= 3.11 found ($PYTHON, else python3, python3.14 ..
#                    python3.11); activated for the rest of the script (PATH), its python in $ZV_PY;
#                    torch's JIT extensions (DeepSpeed's CPU op) built inside it, not in a cache every
#                    environment shares and rebuilds ($TORCH_EXTENSIONS_DIR, unless already set)
#   zv_install [X]   pip install -e '.[X]' into it when scripts/_missing_deps.py finds anything of
#                    pyproject.toml's dependencies (and extra X) missing or out of range
#   zv_chromium ARGS Chromium for the browser test, only when `pytest ARGS` selects it
#                    (scripts/_selects_browser.py): apt-get as root or through sudo; where that cannot
#                    be, a message, and the browser test skips itself
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

zv_can_apt() {  # whether apt-get can install here: sets ZV_SUDO ("" or sudo) or ZV_APT_WHY (why not)
  ZV_SUDO="" ZV_APT_WHY=""
  if ! command -v apt-get >/dev/null 2>&1; then ZV_APT_WHY="no apt-get here"; return 1; fi
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then ZV_APT_WHY="not root, and no sudo"; return 1; fi
    ZV_SUDO="sudo"
    [ -t 0 ] || ZV_SUDO="sudo -n"  # no terminal to ask for a password on: fail rather than hang
  fi
}

zv_apt_install() {  # PACKAGE...; fails (with ZV_APT_WHY set) where it cannot
  zv_can_apt || return 1
  if ! { $ZV_SUDO apt-get update -qq && $ZV_SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }; then
    ZV_APT_WHY="${ZV_SUDO:+$ZV_SUDO }apt-get install $* failed"
    return 1
  fi
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
        case "$base" in
          /usr/bin/*)  # a distribution's Python without its venv module (Debian/Ubuntu: python3.X-venv)
            zv_say "installing python$short-venv (apt-get) for the venv module"
            if zv_apt_install "python$short-venv" && "$base" -m venv "$venv"; then :; else
              rm -rf "$venv"
              zv_die "could not create $venv${ZV_APT_WHY:+ ($ZV_APT_WHY)}: install the venv module" \
                "(Debian/Ubuntu: sudo apt-get install python$short-venv), or activate a virtual environment, and run again."
            fi ;;
          *) zv_die "could not create $venv with '$base -m venv' (see above); activate a virtual environment and run again." ;;
        esac
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
  zv_say "installing: pip install -e '$target'"
  "$ZV_PY" -m pip install --quiet --upgrade pip || zv_say "(pip could not upgrade itself; going on with the one there)"
  "$ZV_PY" -m pip install --quiet -e "$target" || zv_die "pip install -e '$target' failed (see above)."
  missing=$("$ZV_PY" "$ZV_ROOT/scripts/_missing_deps.py" "$ZV_ROOT" --extra "$extra")
  [ -z "$missing" ] || zv_die "still missing after pip install -e '$target':"$'\n'"$missing"
}

zv_chromium_path() { command -v chromium; }

zv_chromium() {  # PYTEST_ARGS...
  local path selected
  if path=$(zv_chromium_path); then
    zv_say "chromium for the browser test: $path"
    return 0
  fi
  selected=$("$ZV_PY" "$ZV_ROOT/scripts/_selects_browser.py" "$@") || selected="yes: (could not tell)"
  case "$selected" in
    no:*)
      zv_say "not installing chromium: the browser test is not selected (${selected#no: })"
      return 0 ;;
  esac
  zv_say "installing Debian's chromium (apt-get) for the browser test: ${selected#yes: }"
  if zv_apt_install chromium && path=$(zv_chromium_path); then
    zv_say "chromium installed: $path"
    return 0
  fi
  zv_say "could not install chromium (${ZV_APT_WHY:-apt-get installed no 'chromium' on PATH}): the browser test will be" \
    "skipped. To run it, put Chromium on PATH as 'chromium' (Debian/Ubuntu: sudo apt-get install chromium) and run again." >&2
  return 0
}
