#!/usr/bin/env bash
# Makes sure Debian's Chromium (driven by Playwright in tests/test_browser.py) and a font for legible pages are installed.
set -euo pipefail
PACKAGES=(chromium fonts-dejavu-core)
[[ -x /usr/bin/chromium && -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: /usr/bin/chromium is missing; install it (Debian/Ubuntu: sudo apt-get install --no-install-recommends ${PACKAGES[*]})" >&2
    exit 1
fi
echo "ensure-chromium: installing ${PACKAGES[*]} with apt-get ..." >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "ensure-chromium: apt-get install ${PACKAGES[*]} failed (output above)" >&2
    exit 1
fi
[[ -x /usr/bin/chromium ]] || { echo "ensure-chromium: /usr/bin/chromium still missing after the install" >&2; exit 1; }
