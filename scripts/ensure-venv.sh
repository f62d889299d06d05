#!/usr/bin/env bash
# Makes .venv (Python >= 3.11) and installs the project with its dev extras, again only when pyproject.toml changed.
#
# usage: scripts/ensure-venv.sh        (PYTHON=/path/to/python3.x picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PROG=ensure-venv
VENV=.venv
STAMP=$VENV/.pyproject.sha256
die() {
    echo "$PROG: $*" >&2
    exit 1
}
is_root() { [[ $(id -u) -eq 0 ]]; }
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    echo "$PROG: installing $* with apt-get ..." >&2
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive bash -c 'apt-get update -q && apt-get install -y -q --no-install-recommends "$@"' \
        apt "$@" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

find_python() {
    local c
    for c in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$c" >/dev/null 2>&1 && new_enough "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

venv_ok() { [[ -x $VENV/bin/python ]] && new_enough "$VENV/bin/python" && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

if ! venv_ok; then
    if ! PY=$(find_python) && is_root && ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-venv || true
    fi
    PY=$(find_python) || die "Python >= 3.11 is required (found: $(python3 --version 2>&1 || echo none)); install it or set PYTHON=/path/to/python3.11+"
    # --clear: a half-made .venv (e.g. from a run without python3-venv) is unusable anyway.
    if ! "$PY" -m venv --clear "$VENV" >/dev/null 2>&1; then
        is_root || die "'$PY -m venv' failed; install the venv module (Debian/Ubuntu: sudo apt-get install python3-venv)"
        apt_install python3-venv || die "could not install python3-venv with apt-get"
        "$PY" -m venv --clear "$VENV" >/dev/null || die "'$PY -m venv $VENV' failed"
    fi
    venv_ok || die "$VENV was created but has no working pip"
fi

want=$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [[ -f $STAMP && $(<"$STAMP") == "$want" ]]; then
    echo "$PROG: $VENV is up to date"
    exit 0
fi

echo "$PROG: installing the project and its dev tools into $VENV ..."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -e '.[dev]' >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "pip install -e '.[dev]' failed (output above)"
fi
echo "$want" >"$STAMP"
