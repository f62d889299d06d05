#!/usr/bin/env bash
# Runs the whole service on this machine: Redis (a private one under data/redis when none answers at REDIS_URL),
# the web server and, once the worker package defines WorkerSettings, the arq worker. Ctrl-C stops all of it:
# the first lets the answers in flight finish and their writes land (as long as the server's SHUTDOWN_DRAIN_S and
# SHUTDOWN_FLUSH_S allow), a second cuts that short (the server spools what it has not written yet).
#
# usage: scripts/run.sh          (settings come from the environment, then .env, then the built-in defaults)
# shellcheck disable=SC2317  # functions run from traps look unreachable to shellcheck
set -euo pipefail
cd "$(dirname "$0")/.."

PROG=run
PY=.venv/bin/python
FORCE_WAIT=5 # after a second stop signal the server spools what is left and exits within about 2 s
STOP_GRACE=15 # how long the first stop may take: derived from the server's own settings below, once readable
STOP_REQUESTS=0
STOPPING=0
SERVER_PID=""
WORKER_PID=""
REDIS_PID=""
POLICY_RC_D_CREATED=0

say() { echo "$PROG: $*" >&2; }
die() {
    say "$*"
    exit 1
}

[[ -x $PY ]] || bash scripts/ensure-venv.sh

# --- children ------------------------------------------------------------------------------------------

# Each child gets a session of its own, so a terminal's Ctrl-C reaches only this script, which then stops
# the children once and in order (the server before the Redis it uses), and a second Ctrl-C means "at once"
# only when the user presses it. Without setsid the same holds: bash starts background jobs with SIGINT ignored.
launch() {
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" </dev/null &
    else
        "$@" </dev/null &
    fi
}

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

name_of() {
    case $1 in
    "$SERVER_PID") echo server ;;
    "$WORKER_PID") echo worker ;;
    "$REDIS_PID") echo redis ;;
    *) echo "pid $1" ;;
    esac
}

# Redis holds nothing in flight: SIGTERM, then SIGKILL after $1 seconds.
stop_pids() {
    local timeout=$1 pid deadline
    shift
    for pid in "$@"; do alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
    deadline=$((SECONDS + timeout))
    for pid in "$@"; do
        while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
        if alive "$pid"; then
            say "the $(name_of "$pid") did not stop within ${timeout} s, killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
        [[ -n $pid ]] && wait "$pid" 2>/dev/null
    done
    return 0
}

# The server and the worker: one SIGTERM starts their graceful stop, given all of STOP_GRACE; a stop signal to
# this script meanwhile (a second Ctrl-C) forwards a second SIGTERM, which cuts it short; SIGKILL comes only when
# even that is not obeyed within FORCE_WAIT. Runs from the EXIT trap: on_signal only counts the signals then.
stop_app() {
    local pid deadline forced=0 seen=$STOP_REQUESTS
    local -a pids=() left
    for pid in "$SERVER_PID" "$WORKER_PID"; do alive "$pid" && pids+=("$pid"); done
    [[ ${#pids[@]} -gt 0 ]] || return 0
    if alive "$SERVER_PID"; then
        say "stopping: letting the answers in flight finish and their writes land (up to ${STOP_GRACE} s);" \
            "press Ctrl-C again to stop at once"
    fi
    kill -TERM "${pids[@]}" 2>/dev/null
    deadline=$((SECONDS + STOP_GRACE))
    while :; do
        left=()
        for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
        [[ ${#left[@]} -gt 0 ]] || break
        if ((forced == 0 && STOP_REQUESTS > seen)); then
            say "stopping at once: what the server has not stored yet goes to its spool (SPOOL_DIR), written at" \
                "the next start"
            kill -TERM "${left[@]}" 2>/dev/null
            forced=1
            deadline=$((SECONDS + FORCE_WAIT))
        elif ((SECONDS >= deadline)); then
            for pid in "${left[@]}"; do
                say "the $(name_of "$pid") did not stop within $((forced ? FORCE_WAIT : STOP_GRACE)) s," \
                    "killing it (what it had not written is lost)"
            done
            kill -KILL "${left[@]}" 2>/dev/null
            break
        fi
        sleep 0.1 # a Ctrl-C ends it at once: it is in the terminal's process group (the children are not)
    done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    return 0
}

cleanup() {
    local rc=$?
    set +e
    STOPPING=1
    stop_app
    stop_pids 10 "$REDIS_PID"
    [[ $POLICY_RC_D_CREATED -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    exit "$rc"
}

on_signal() {
    STOP_REQUESTS=$((STOP_REQUESTS + 1))
    [[ $STOPPING -eq 1 ]] && return 0 # stop_app is running and reads the count
    exit 0                            # cleanup (the EXIT trap) stops the children
}

trap cleanup EXIT
trap on_signal INT TERM

# --- settings ------------------------------------------------------------------------------------------

# A setting as the service will see it: the environment first, then .env (read with python-dotenv, as the
# service reads it), then the default.
setting() {
    local name=$1 default=$2 value=${!1:-}
    if [[ -z $value && -f .env ]]; then
        value=$("$PY" -c 'import sys; from dotenv import dotenv_values; print(dotenv_values(".env").get(sys.argv[1]) or "")' "$1")
    fi
    echo "${value:-$default}"
}

REDIS_URL_SETTING=$(setting REDIS_URL redis://localhost:6379)
HOST=$(setting HOST 127.0.0.1)
PORT=$(setting PORT 8001)

# The longest the server's graceful stop may take, from its settings read as it reads them (the environment, then
# .env, then the defaults): the drain (SHUTDOWN_DRAIN_S), the flush before the sockets close (SHUTDOWN_FLUSH_S),
# aiohttp's wait for the handlers (its shutdown_timeout, 10 s), the flush of the last writes once the sockets are
# closed (SHUTDOWN_FLUSH_S again), and 5 s to spare. With a setting it cannot read the server does not start: the
# defaults then.
STOP_GRACE=$("$PY" - <<'EOF'
import math

from core.errors import ConfigError
from core.settings import Settings

try:
    s = Settings.from_env()
except ConfigError:
    s = Settings()
print(math.ceil(s.shutdown_drain_s + 2 * s.shutdown_flush_s) + 10 + 5)
EOF
) || die "cannot read the shutdown settings (above)"

# --- redis ---------------------------------------------------------------------------------------------

redis_answers() {
    # Any reply counts (even "NOAUTH"): then something owns that address and we must not start another.
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys
import redis

try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1, socket_timeout=1).ping()
except (redis.ConnectionError, redis.TimeoutError, OSError):
    sys.exit(1)
except redis.RedisError:
    pass
EOF
}

install_redis() {
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "no Redis answers at $REDIS_URL_SETTING and redis-server is not installed; install it (Debian/Ubuntu: sudo apt-get install redis-server) or set REDIS_URL"
    fi
    say "installing redis-server with apt-get ..."
    # Keep the package from starting its own daemon: we run a private one below.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_D_CREATED=1
    fi
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive bash -c \
        'apt-get update -q && apt-get install -y -q --no-install-recommends redis-server' >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        die "apt-get install redis-server failed (output above)"
    fi
    rm -f "$log"
    if [[ $POLICY_RC_D_CREATED -eq 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_D_CREATED=0
    fi
}

start_private_redis() {
    local port=$1 dir=$PWD/data/redis
    command -v redis-server >/dev/null 2>&1 || install_redis
    mkdir -p "$dir"
    say "no Redis at $REDIS_URL_SETTING; starting one on 127.0.0.1:$port (data in data/redis, log in data/redis/redis.log)"
    launch redis-server --port "$port" --bind 127.0.0.1 -::1 --dir "$dir" --appendonly yes --save '' \
        --daemonize no --logfile "$dir/redis.log"
    REDIS_PID=$!
    local deadline=$((SECONDS + 15))
    until redis_answers "redis://127.0.0.1:$port"; do
        if ! alive "$REDIS_PID" || ((SECONDS >= deadline)); then
            tail -n 20 "$dir/redis.log" >&2 || true
            die "the private Redis did not start on 127.0.0.1:$port (log above)"
        fi
        sleep 0.2
    done
}

if ! redis_answers "$REDIS_URL_SETTING"; then
    read -r R_SCHEME R_HOST R_PORT < <("$PY" -c '
import sys
from urllib.parse import urlsplit

u = urlsplit(sys.argv[1])
print(u.scheme, u.hostname or "localhost", u.port or 6379)
' "$REDIS_URL_SETTING") || die "cannot read REDIS_URL=$REDIS_URL_SETTING"
    case "$R_SCHEME:$R_HOST" in
    redis:localhost | redis:127.* | redis:::1) start_private_redis "$R_PORT" ;;
    *) say "warning: no Redis answers at $REDIS_URL_SETTING (not local, so not starting one); summaries wait until it does" ;;
    esac
fi

# --- server and worker ---------------------------------------------------------------------------------

launch "$PY" -m server
SERVER_PID=$!

case $HOST in
"" | 0.0.0.0 | "::" | "[::]") PROBE_HOST=127.0.0.1 ;;
*:*)
    PROBE_HOST=${HOST#[}
    PROBE_HOST="[${PROBE_HOST%]}]"
    ;;
*) PROBE_HOST=$HOST ;;
esac
URL="http://$PROBE_HOST:$PORT/"

# Wait for /healthz while the server lives: 0 = answering, 2 = the server exited, 1 = still silent after 60 s.
health=0
"$PY" - "${URL}healthz" "$SERVER_PID" <<'EOF' || health=$?
import os, sys, time, urllib.request

url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:  # refused, reset, timeout, or a URL it cannot even parse: all mean "not yet"
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(2)
    time.sleep(0.2)
sys.exit(1)
EOF
case $health in
0) say "the service is up: open $URL" ;;
1) say "warning: $URL healthz is not answering after 60 s; still waiting on the server" ;;
*)
    rc=0
    wait "$SERVER_PID" || rc=$?
    SERVER_PID=""
    say "the server exited with status $rc before answering $URL"
    exit $((rc == 0 ? 1 : rc))
    ;;
esac

worker_rc=0
"$PY" -c '
import sys
import worker
sys.exit(0 if hasattr(worker, "WorkerSettings") else 3)
' >/dev/null || worker_rc=$?
case $worker_rc in
0)
    launch .venv/bin/arq worker.WorkerSettings
    WORKER_PID=$!
    say "worker started (arq worker.WorkerSettings)"
    ;;
3) say "worker.WorkerSettings is not defined yet; running without the worker" ;;
*) say "warning: the worker package failed to import (above); running without the worker" ;;
esac

# Run until a child exits (or a signal arrives); a child that exits on its own takes the rest down with it.
exited=""
rc=0
wait -n -p exited || rc=$?
name=child
case ${exited:-} in
"$SERVER_PID") name=server SERVER_PID="" ;;
"$WORKER_PID") name=worker WORKER_PID="" ;;
"$REDIS_PID") name=redis REDIS_PID="" ;;
esac
say "the $name exited with status $rc; stopping the rest"
exit "$rc"
