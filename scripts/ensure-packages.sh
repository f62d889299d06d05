#!/usr/bin/env bash
# Installs Debian packages the tests need, once, when any of the named commands or files is missing.
#
# usage: scripts/ensure-packages.sh NEEDED... -- PACKAGE...
#   NEEDED: a command name or an absolute path that must exist afterwards.
# As root with apt-get, installs the packages (--no-install-recommends); otherwise says what to install.
set -euo pipefail
PROG=ensure-packages
needed=()
while [[ $# -gt 0 && $1 != -- ]]; do
    needed+=("$1")
    shift
done
[[ ${1:-} == -- ]] || { echo "usage: $0 NEEDED... -- PACKAGE..." >&2; exit 2; }
shift
packages=("$@")

present() {
    if [[ $1 == /* ]]; then [[ -e $1 ]]; else command -v "$1" >/dev/null 2>&1; fi
}
missing=()
for item in "${needed[@]}"; do present "$item" || missing+=("$item"); done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$PROG: missing ${missing[*]}; install it (Debian/Ubuntu: sudo apt-get install --no-install-recommends ${packages[*]})" >&2
    exit 1
fi
echo "$PROG: installing ${packages[*]} with apt-get ..." >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${packages[@]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "$PROG: apt-get install ${packages[*]} failed (output above)" >&2
    exit 1
fi
for item in "${needed[@]}"; do
    present "$item" || { echo "$PROG: $item still missing after the install" >&2; exit 1; }
done
