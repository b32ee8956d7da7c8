#!/usr/bin/env bash
# A team's MLflow tracking server: PostgreSQL as the backend store (safe with many writers, where SQLite on a
# cluster's shared file system is not), artifacts in a shared folder, served through the tracking server.
#
#   bash scripts/tracking_server.sh start  [--port P] [--host H] [--data DIR] [--artifacts DIR] [--workers N]
#   bash scripts/tracking_server.sh stop   [--data DIR]
#   bash scripts/tracking_server.sh status [--data DIR]
#
# start: `initdb` in DIR/postgres (once; owned by the system user `postgres` when run as root, since initdb refuses
# root), PostgreSQL on 127.0.0.1 and a free port (socket in DIR), a role and a database `mlflow` with a random
# password kept in DIR/postgres.password (mode 600), then `mlflow server --backend-store-uri postgresql://...
# --artifacts-destination ARTIFACTS` in the background (pid and log in DIR). It prints the URI to use:
#   MLFLOW_TRACKING_URI=http://HOST:PORT   (or mlflow.tracking_uri in params.yaml)
# Defaults: DIR /tmp/hubert-pipeline-mlflow, ARTIFACTS DIR/artifacts (a lab: a folder on the shared file system),
# PORT the last one used in DIR, else a free one (a lab: a fixed one, e.g. 5000), HOST 127.0.0.1 (a lab: the
# machine's address; clients then upload and download artifacts through the server, no shared mount needed).
# A restart keeps the database and the artifacts. Needs Debian's postgresql (bash run.sh setup installs it) and the
# project's environment (.venv, or PYTHON=/path/to/python with mlflow and psycopg2).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: bash scripts/tracking_server.sh {start|stop|status} [--port P] [--host H] [--data DIR] [--artifacts DIR]
                                      [--workers N]
USAGE
}

die() { echo "tracking-server: $*" >&2; exit 1; }
say() { echo "tracking-server: $*"; }

action=${1:-}
[[ $# -gt 0 ]] && shift
data=/tmp/hubert-pipeline-mlflow port="" host=127.0.0.1 artifacts="" workers=2
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --data) data=$2; shift 2 ;;
        --artifacts) artifacts=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x $python ]] || python=python3

pg_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $bin ]] || bin=$(dirname "$(command -v initdb 2>/dev/null || echo /none/initdb)")
    [[ -x $bin/initdb ]] || die "PostgreSQL not found: install Debian's postgresql (bash run.sh setup)"
    echo "$bin"
}

as_pg() {  # run as the system user postgres when root (initdb and postgres refuse root), else as ourselves
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_postgres() {
    local bin=$1 pgdata=$data/postgres
    if [[ $(id -u) == 0 ]] && ! runuser -u postgres -- test -x "$data"; then
        die "the system user postgres cannot reach $data: choose a folder whose parents it may enter (o+x)"
    fi
    if [[ ! -f $pgdata/PG_VERSION ]]; then
        mkdir -p "$pgdata" "$data/socket"
        [[ $(id -u) == 0 ]] && chown postgres:postgres "$pgdata" "$data/socket"
        chmod 700 "$pgdata"
        (umask 077; "$python" -c 'import secrets; print(secrets.token_hex(16))' >"$data/postgres.password")
        as_pg "$bin/initdb" -D "$pgdata" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
            -E UTF8 --locale=C.UTF-8 >"$data/initdb.log"
    fi
    if ! as_pg "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
        local pgport
        pgport=$(cat "$data/postgres.port" 2>/dev/null || free_port)
        echo "$pgport" >"$data/postgres.port"
        as_pg "$bin/pg_ctl" -D "$pgdata" -l "$pgdata/postgres.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $pgport -k $data/socket" start >/dev/null \
            || { tail -n 20 "$pgdata/postgres.log" >&2; die "PostgreSQL did not start (log: $pgdata/postgres.log)"; }
    fi
    local pgport password sql
    pgport=$(cat "$data/postgres.port")
    password=$(cat "$data/postgres.password")
    sql=(as_pg "$bin/psql" -h "$data/socket" -p "$pgport" -U postgres -d postgres -tAq -v ON_ERROR_STOP=1)
    if [[ -z $("${sql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'") ]]; then
        "${sql[@]}" -c "CREATE ROLE mlflow LOGIN PASSWORD '$password'"
        "${sql[@]}" -c "CREATE DATABASE mlflow OWNER mlflow"
    fi
    echo "postgresql+psycopg2://mlflow:$password@127.0.0.1:$pgport/mlflow"
}

wait_for_health() {
    for _ in $(seq 240); do
        if "$python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null
        then return 0; fi
        alive "$data/mlflow.pid" || break
        sleep 0.5
    done
    tail -n 30 "$data/mlflow.log" >&2
    die "mlflow server did not answer on port $port (log: $data/mlflow.log)"
}

start() {
    mkdir -p "$data"
    chmod 755 "$data"
    local bin backend
    bin=$(pg_bin)
    if alive "$data/mlflow.pid"; then
        say "already running: MLFLOW_TRACKING_URI=$(cat "$data/uri")"; return 0
    fi
    backend=$(start_postgres "$bin")
    artifacts=${artifacts:-$(cat "$data/artifacts.path" 2>/dev/null || echo "$data/artifacts")}
    mkdir -p "$artifacts"
    artifacts=$(cd "$artifacts" && pwd)
    port=${port:-$(cat "$data/mlflow.port" 2>/dev/null || free_port)}
    echo "$port" >"$data/mlflow.port"
    echo "$artifacts" >"$data/artifacts.path"
    setsid "$python" -m mlflow server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
        --host "$host" --port "$port" --workers "$workers" >"$data/mlflow.log" 2>&1 </dev/null &
    echo $! >"$data/mlflow.pid"
    wait_for_health
    local shown=$host
    [[ $host == 0.0.0.0 ]] && shown=$(hostname -f)
    echo "http://$shown:$port" >"$data/uri"
    say "up: PostgreSQL in $data/postgres, artifacts in $artifacts, log $data/mlflow.log"
    echo "MLFLOW_TRACKING_URI=http://$shown:$port"
}

stop() {
    if alive "$data/mlflow.pid"; then
        local pid
        pid=$(cat "$data/mlflow.pid")
        kill -- "-$pid" 2>/dev/null || kill "$pid"  # the server's process group: uvicorn and its workers
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 -- "-$pid" 2>/dev/null || true
        say "stopped mlflow server ($pid)"
    fi
    rm -f "$data/mlflow.pid"
    if [[ -f $data/postgres/PG_VERSION ]] && as_pg "$(pg_bin)/pg_ctl" -D "$data/postgres" status >/dev/null 2>&1; then
        as_pg "$(pg_bin)/pg_ctl" -D "$data/postgres" -m fast -w stop >/dev/null
        say "stopped PostgreSQL ($data/postgres)"
    fi
}

status() {
    if alive "$data/mlflow.pid"; then
        say "running (pid $(cat "$data/mlflow.pid")): MLFLOW_TRACKING_URI=$(cat "$data/uri")"
    else
        say "not running ($data)"; return 3
    fi
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage >&2; exit 2 ;;
esac
