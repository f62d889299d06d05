#!/usr/bin/env bash
# Makes sure `docker-compose` (Debian's, used only to validate docker-compose.yml) is installed.
set -euo pipefail
command -v docker-compose >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-docker-compose: docker-compose is missing; install it (Debian/Ubuntu: sudo apt-get install docker-compose)" >&2
    exit 1
fi
echo "ensure-docker-compose: installing docker-compose with apt-get ..." >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends docker-compose; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "ensure-docker-compose: apt-get install docker-compose failed (output above)" >&2
    exit 1
fi
