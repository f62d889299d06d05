#!/usr/bin/env bash
# Runs a command against a private, throwaway PostgreSQL and Redis on free loopback ports.
#
# usage: scripts/with-services.sh COMMAND [ARGS...]
#
# Installs the server binaries with apt-get when they are missing and we are root (otherwise says what to
# install and exits 1), starts both services in a temporary directory, runs COMMAND with these exported:
#
#   TEST_DATABASE_URL  postgresql://postgres@127.0.0.1:PORT/test     (trust auth, database `test`)
#   TEST_REDIS_URL     redis://127.0.0.1:PORT/0
#   TEST_PG_BIN        directory of the PostgreSQL binaries (pg_ctl, psql, ...)
#   TEST_PG_DATA       the cluster's data directory
#   TEST_PG_PORT, TEST_REDIS_PORT
#   TEST_PG_RUN_AS     OS user the cluster runs as when we are root (`postgres`), empty otherwise
#   TEST_SERVICES_DIR  the temporary directory, holding the logs and two helpers for fault injection:
#       $TEST_SERVICES_DIR/pg-ctl stop|start|restart|status [pg_ctl options, e.g. -m immediate]
#       $TEST_SERVICES_DIR/redis-ctl stop|start|restart|kill|status
#     Both return once the service is really down or answering again.
#
# Afterwards, whatever happened (failure, Ctrl-C, SIGTERM), it stops both services and the command's
# leftover processes, removes the directory, and exits with the command's status.
# shellcheck disable=SC2317  # functions run from traps look unreachable to shellcheck
set -euo pipefail

PROG=with-services
die() {
    echo "$PROG: $*" >&2
    exit 1
}

[[ $# -ge 1 ]] || {
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
}

IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

SERVICES_DIR=""
CHILD_PID=""
POLICY_RC_D_CREATED=0

# --- process bookkeeping -------------------------------------------------------------------------------

# All descendants of a pid, read from /proc (procps is not installed on a minimal Debian).
descendants() {
    local root=$1 f line rest pid ppid
    if [[ ! -d /proc/self ]]; then
        local c
        for c in $(pgrep -P "$root" 2>/dev/null || true); do
            echo "$c"
            descendants "$c"
        done
        return 0
    fi
    local -A kids=()
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        pid=${line%% *}
        rest=${line##*) } # fields after "(comm)": state ppid ...
        rest=${rest#* }
        ppid=${rest%% *}
        kids[$ppid]+="$pid "
    done
    local -a queue=("$root")
    while [[ ${#queue[@]} -gt 0 ]]; do
        local p=${queue[0]}
        queue=("${queue[@]:1}")
        for pid in ${kids[$p]:-}; do
            echo "$pid"
            queue+=("$pid")
        done
    done
}

alive() { kill -0 "$1" 2>/dev/null; }

# Send a signal to a process and everything below it (collected first: once the parent dies they reparent).
signal_tree() {
    local sig=$1 root=$2
    local -a pids
    mapfile -t pids < <(descendants "$root")
    kill "-$sig" "$root" "${pids[@]}" 2>/dev/null || true
}

# Wait up to $2 seconds for pid $1 to go away.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while alive "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

stop_child() {
    local first_sig=$1
    [[ -n $CHILD_PID ]] && alive "$CHILD_PID" || return 0
    # A terminal's Ctrl-C already reached the command (same process group): give it a moment to finish on
    # its own rather than interrupting its cleanup with a second signal.
    [[ $first_sig == INT ]] && wait_gone "$CHILD_PID" 3 && return 0
    signal_tree "$first_sig" "$CHILD_PID"
    wait_gone "$CHILD_PID" 5 && return 0
    signal_tree TERM "$CHILD_PID"
    wait_gone "$CHILD_PID" 5 && return 0
    echo "$PROG: command did not stop, killing it" >&2
    signal_tree KILL "$CHILD_PID"
    wait_gone "$CHILD_PID" 2 || true
}

cleanup() {
    local rc=$?
    set +e
    trap '' INT TERM
    stop_child TERM
    if [[ -n $SERVICES_DIR && -d $SERVICES_DIR ]]; then
        [[ -x $SERVICES_DIR/pg-ctl ]] && stop_postgres
        [[ -x $SERVICES_DIR/redis-ctl ]] && "$SERVICES_DIR/redis-ctl" stop >/dev/null 2>&1
        rm -rf -- "$SERVICES_DIR"
    fi
    [[ $POLICY_RC_D_CREATED -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    exit "$rc"
}

on_signal() {
    local sig=$1 code=$2
    trap '' INT TERM
    echo "$PROG: got SIG$sig, stopping" >&2
    stop_child "$sig"
    exit "$code"
}

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

# --- binaries ------------------------------------------------------------------------------------------

find_pg_bin() {
    local d best=""
    # Debian/Ubuntu layout; take the highest version.
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V); do
        [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && best=$d
    done
    if [[ -z $best ]] && command -v pg_config >/dev/null 2>&1; then
        d=$(pg_config --bindir 2>/dev/null || true)
        [[ -n $d && -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && best=$d
    fi
    if [[ -z $best ]] && command -v initdb >/dev/null 2>&1; then
        d=$(dirname "$(command -v initdb)")
        [[ -x $d/pg_ctl && -x $d/postgres ]] && best=$d
    fi
    echo "$best"
}

apt_install() {
    echo "$PROG: installing $* with apt-get ..." >&2
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* with your package manager"
    # Keep the packages' postinst from starting their own daemons on 5432/6379: we never use them.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_D_CREATED=1
    fi
    local log=$SERVICES_DIR/apt.log
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get install $* failed (output above)"
    fi
    if [[ $POLICY_RC_D_CREATED -eq 1 ]]; then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_D_CREATED=0
    fi
}

ensure_binaries() {
    local -a missing=()
    PG_BIN=$(find_pg_bin)
    [[ -n $PG_BIN ]] || missing+=(postgresql)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    if [[ ${#missing[@]} -gt 0 ]]; then
        [[ $IS_ROOT -eq 1 ]] || die "missing ${missing[*]}; install it first (Debian/Ubuntu: sudo apt-get install ${missing[*]})"
        apt_install "${missing[@]}"
        PG_BIN=$(find_pg_bin)
        [[ -n $PG_BIN ]] || die "PostgreSQL binaries still not found after installing postgresql"
        command -v redis-server >/dev/null 2>&1 || die "redis-server still not found after installing redis-server"
    fi
    local b
    for b in pg_isready createdb; do
        [[ -x $PG_BIN/$b ]] || die "$PG_BIN/$b not found; install the PostgreSQL client tools"
    done
    REDIS_SERVER=$(command -v redis-server)
    REDIS_CLI=$(command -v redis-cli || true)
    PYTHON3=$(command -v python3 || true)
    [[ -n $REDIS_CLI || -n $PYTHON3 ]] || die "need redis-cli or python3 to talk to Redis"
}

# initdb and postgres refuse to run as root: run them as the `postgres` OS user then.
ensure_pg_user() {
    RUN_AS=""
    [[ $IS_ROOT -eq 1 ]] || return 0
    RUN_AS=postgres
    if ! id -u postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres ||
            die "could not create the postgres OS user"
    fi
    command -v runuser >/dev/null 2>&1 || die "runuser not found (util-linux)"
}

free_ports() {
    python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
'
}

# --- helpers written into the services directory ----------------------------------------------------

write_pg_ctl() {
    local runner=""
    [[ -n $RUN_AS ]] && runner="runuser -u $RUN_AS --"
    cat >"$SERVICES_DIR/pg-ctl" <<EOF
#!/usr/bin/env bash
# Controls the test PostgreSQL of scripts/with-services.sh: pg-ctl start|stop|restart|status [pg_ctl options]
set -euo pipefail
[[ \$# -ge 1 ]] || { echo "usage: \$0 start|stop|restart|status [pg_ctl options, e.g. -m immediate]" >&2; exit 2; }
cd $(printf %q "$SERVICES_DIR")
cmd=\$1
shift
exec $runner $(printf %q "$PG_BIN/pg_ctl") -D $(printf %q "$PG_DATA") -l $(printf %q "$SERVICES_DIR/postgres.log") -w -t 30 -s "\$cmd" "\$@" </dev/null
EOF
    chmod 755 "$SERVICES_DIR/pg-ctl"
}

write_redis_ctl() {
    local dir=$SERVICES_DIR
    cat >"$dir/redis-ctl" <<EOF
#!/usr/bin/env bash
# Controls the test Redis of scripts/with-services.sh: redis-ctl start|stop|restart|kill|status
set -euo pipefail
PORT=$REDIS_PORT
PIDFILE=$(printf %q "$dir/redis.pid")
LOG=$(printf %q "$dir/redis.log")
REDIS_SERVER=$(printf %q "$REDIS_SERVER")
REDIS_CLI=$(printf %q "$REDIS_CLI")
DATA=$(printf %q "$dir/redis")

# The pid of the Redis answering on our port (empty when none does): it must be ours, not some other server.
answering_pid() {
    if [[ -n \$REDIS_CLI ]]; then
        "\$REDIS_CLI" -h 127.0.0.1 -p "\$PORT" info server 2>/dev/null | sed -n 's/^process_id:\\([0-9]*\\).*/\\1/p'
    else
        python3 -c '
import re, socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
        s.sendall(b"INFO server\\r\\n")
        m = re.search(rb"process_id:(\\d+)", s.recv(65536))
        print(m.group(1).decode() if m else "")
except OSError:
    pass
' "\$PORT"
    fi
}

running_pid() {
    local pid
    [[ -s \$PIDFILE ]] || return 1
    pid=\$(<"\$PIDFILE")
    kill -0 "\$pid" 2>/dev/null || return 1
    echo "\$pid"
}

start() {
    if running_pid >/dev/null; then return 0; fi
    mkdir -p "\$DATA"
    local pid from
    from=\$((\$(wc -c 2>/dev/null <"\$LOG" || echo 0) + 1)) # read only what this start logs
    "\$REDIS_SERVER" --port "\$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "\$DATA" \\
        --daemonize yes --pidfile "\$PIDFILE" --logfile "\$LOG" </dev/null >>"\$LOG" 2>&1
    for _ in \$(seq 1 100); do
        pid=\$(running_pid) && [[ \$(answering_pid) == "\$pid" ]] && return 0
        if tail -c "+\$from" "\$LOG" 2>/dev/null | grep -qi "address already in use"; then
            echo "redis-ctl: port \$PORT is taken by another process" >&2
            return 75
        fi
        sleep 0.1
    done
    tail -c "+\$from" "\$LOG" | tail -n 20 >&2 || true
    echo "redis-ctl: Redis did not start on 127.0.0.1:\$PORT" >&2
    return 1
}

stop() {
    local sig=\${1:-TERM} pid
    pid=\$(running_pid) || { rm -f "\$PIDFILE"; return 0; }
    kill "-\$sig" "\$pid" 2>/dev/null || true
    for _ in \$(seq 1 100); do
        kill -0 "\$pid" 2>/dev/null || { rm -f "\$PIDFILE"; return 0; }
        sleep 0.1
    done
    kill -KILL "\$pid" 2>/dev/null || true
    rm -f "\$PIDFILE"
}

case \${1:-} in
start) start ;;
stop) stop TERM ;;
kill) stop KILL ;;
restart) stop TERM && start ;;
status) if pid=\$(running_pid) && [[ \$(answering_pid) == "\$pid" ]]; then echo "redis running on 127.0.0.1:\$PORT"; else echo "redis stopped"; exit 3; fi ;;
*) echo "usage: \$0 start|stop|restart|kill|status" >&2; exit 2 ;;
esac
EOF
    chmod 755 "$dir/redis-ctl"
}

# --- postgres ------------------------------------------------------------------------------------------

as_pg_user() {
    if [[ -n $RUN_AS ]]; then
        (cd "$SERVICES_DIR" && runuser -u "$RUN_AS" -- "$@")
    else
        (cd "$SERVICES_DIR" && "$@")
    fi
}

write_pg_conf() {
    # In a file of its own (not -c flags), so that `pg-ctl stop` + `pg-ctl start` keeps these settings.
    as_pg_user tee "$PG_DATA/with-services.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$SERVICES_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

stop_postgres() {
    [[ -n ${PG_DATA:-} && -f $PG_DATA/postmaster.pid ]] || return 0
    "$SERVICES_DIR/pg-ctl" stop -m immediate >/dev/null 2>&1 && return 0
    # pg_ctl could not stop it: kill the postmaster directly; its children exit when it is gone.
    local pid
    pid=$(head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true)
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null
    return 0
}

start_postgres() {
    as_pg_user "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U postgres --no-sync -E UTF8 --locale=C \
        >"$SERVICES_DIR/initdb.log" 2>&1 || {
        tail -n 30 "$SERVICES_DIR/initdb.log" >&2
        die "initdb failed (output above)"
    }
    echo "include 'with-services.conf'" | as_pg_user tee -a "$PG_DATA/postgresql.conf" >/dev/null
    write_pg_ctl
    local attempt from log=$SERVICES_DIR/postgres.log
    for attempt in 1 2 3; do
        write_pg_conf
        from=$(($(wc -c 2>/dev/null <"$log" || echo 0) + 1)) # read only what this attempt logs
        if "$SERVICES_DIR/pg-ctl" start >/dev/null 2>&1; then
            break
        fi
        # Someone took the port between our probe and the bind: pick another.
        if [[ $attempt -lt 3 ]] && tail -c "+$from" "$log" 2>/dev/null | grep -q "Address already in use"; then
            read -r PG_PORT _ < <(free_ports)
            continue
        fi
        tail -c "+$from" "$log" 2>/dev/null | tail -n 30 >&2 || true
        die "PostgreSQL did not start (log above)"
    done
    local deadline=$((SECONDS + 30))
    until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres; do
        if ((SECONDS >= deadline)); then
            tail -n 30 "$SERVICES_DIR/postgres.log" >&2 || true
            die "PostgreSQL on 127.0.0.1:$PG_PORT not ready after 30 s (log above)"
        fi
        sleep 0.2
    done
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres test || die "createdb test failed"
}

start_redis() {
    local attempt rc
    for attempt in 1 2 3; do
        write_redis_ctl
        rc=0
        "$SERVICES_DIR/redis-ctl" start 2>"$SERVICES_DIR/redis-ctl.err" || rc=$?
        [[ $rc -eq 0 ]] && return 0
        "$SERVICES_DIR/redis-ctl" stop >/dev/null 2>&1 || true
        # 75: someone took the port between our probe and the bind; pick another.
        if [[ $attempt -lt 3 && $rc -eq 75 ]]; then
            read -r _ REDIS_PORT < <(free_ports)
            continue
        fi
        cat "$SERVICES_DIR/redis-ctl.err" >&2
        die "Redis did not start"
    done
}

# --- main ----------------------------------------------------------------------------------------------

# Give a closed stdin/stdout/stderr (some CI runners close stdin) /dev/null: else the next open() takes the
# number (bash even parks this script on it) and the command or a daemon reads or writes the wrong file.
fd_closed() {
    if [[ -d /proc/$$/fd ]]; then
        [[ ! -e /proc/$$/fd/$1 || /proc/$$/fd/$1 -ef ${BASH_SOURCE[0]} ]]
    else
        ! { true >&"$1"; } 2>/dev/null && ! { true <&"$1"; } 2>/dev/null
    fi
}
if fd_closed 0; then exec </dev/null; fi
if fd_closed 1; then exec >/dev/null; fi
if fd_closed 2; then exec 2>/dev/null; fi

command -v python3 >/dev/null 2>&1 || die "python3 not found"
# PostgreSQL's socket path must stay short (about 100 bytes): fall back to /tmp for a long $TMPDIR.
base=${TMPDIR:-/tmp}
[[ ${#base} -le 60 && -d $base ]] || base=/tmp
SERVICES_DIR=$(mktemp -d "$base/with-services.XXXXXX")
ensure_binaries
ensure_pg_user
if [[ -n $RUN_AS ]]; then
    chown "$RUN_AS" "$SERVICES_DIR"
    # The cluster's user must reach the directory, which a $TMPDIR under /root does not allow.
    if ! runuser -u "$RUN_AS" -- test -w "$SERVICES_DIR"; then
        rm -rf -- "$SERVICES_DIR"
        SERVICES_DIR=$(mktemp -d /tmp/with-services.XXXXXX)
        chown "$RUN_AS" "$SERVICES_DIR"
    fi
fi
PG_DATA=$SERVICES_DIR/pgdata
read -r PG_PORT REDIS_PORT < <(free_ports)
[[ -n ${PG_PORT:-} && -n ${REDIS_PORT:-} ]] || die "could not find free ports"

start_postgres
start_redis

export TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$PG_PORT/test"
export TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export TEST_PG_BIN=$PG_BIN
export TEST_PG_DATA=$PG_DATA
export TEST_PG_PORT=$PG_PORT
export TEST_REDIS_PORT=$REDIS_PORT
export TEST_PG_RUN_AS=$RUN_AS
export TEST_SERVICES_DIR=$SERVICES_DIR
echo "$PROG: postgres on 127.0.0.1:$PG_PORT, redis on 127.0.0.1:$REDIS_PORT ($SERVICES_DIR)" >&2

# In the background so that a signal to this script is handled at once; `trap - INT QUIT` undoes the
# SIGINT/SIGQUIT ignoring bash gives background jobs, and stdin is passed on explicitly (else: /dev/null).
(
    trap - INT QUIT
    exec "$@"
) <&0 &
CHILD_PID=$!
status=0
wait "$CHILD_PID" || status=$?
CHILD_PID=""
exit "$status"
