#!/usr/bin/env bash
# A single-node SLURM cluster on loopback, for the tests and for trying the SLURM path on one machine.
#
#   bash slurm/local-cluster.sh start [STATE_DIR]   # munged + slurmctld + slurmd; prints SLURM_CONF
#   bash slurm/local-cluster.sh stop  [STATE_DIR]   # stops the daemons this script started
#   bash slurm/local-cluster.sh status [STATE_DIR]
#
# Needs Debian's slurm-wlm and munge (`bash run.sh setup` installs them) and root (slurmd runs jobs as their user).
# Everything lives in STATE_DIR (default /tmp/hubert-pipeline-slurm): config, spool, logs, a munge socket of its
# own, so a system SLURM or munge is left alone. Clients find the cluster through SLURM_CONF=STATE_DIR/slurm.conf;
# params `slurm.conf` (profile slurm/profiles/local-test.yaml) sets it for the pipeline's jobs.
# Accounting is off and processes are tracked without cgroups (proctrack/linuxproc, task/none), so it runs in
# containers and VMs alike.
set -euo pipefail

action=${1:-}
state=${2:-/tmp/hubert-pipeline-slurm}

die() { echo "local-cluster: $*" >&2; exit 1; }

stop_pid() {  # stop_pid FILE NAME
    local file=$1 name=$2
    [[ -f $file ]] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        echo "local-cluster: stopped $name ($pid)"
    fi
    rm -f "$file"
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their user)"
    for exe in munged slurmctld slurmd sbatch; do
        command -v "$exe" >/dev/null || die "$exe not found: install Debian's slurm-wlm and munge (bash run.sh setup)"
    done
    if [[ -f $state/slurmctld.pid ]] && kill -0 "$(cat "$state/slurmctld.pid")" 2>/dev/null; then
        echo "local-cluster: already running in $state"
        echo "SLURM_CONF=$state/slurm.conf"
        return 0
    fi
    mkdir -p "$state"/{ctld,spool,log,munge}
    chmod 755 "$state"
    chown munge:munge "$state/munge"
    chmod 711 "$state/munge"
    local key=$state/munge/munge.key
    if [[ ! -f $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key"
        chmod 400 "$key"
    fi
    local socket=$state/munge/munge.socket
    runuser -u munge -- munged --socket="$socket" --key-file="$key" --pid-file="$state/munge/munged.pid" \
        --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed"
    cp "$state/munge/munged.pid" "$state/munged.pid"

    local cpus mem_mb host
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # GNU nproc obeys OMP_NUM_THREADS: not the node size
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    host=$(hostname -s)
    cat >"$state/slurm.conf" <<EOF
ClusterName=hubert-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MaxArraySize=10001
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmdTimeout=120
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    export SLURM_CONF=$state/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 100); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "local-cluster: up in $state ($cpus CPUs, ${mem_mb} MB)"
            echo "SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    tail -n 20 "$state/log/slurmctld.log" "$state/log/slurmd.log" >&2 || true
    die "the node did not come up; logs are in $state/log"
}

stop() {
    if [[ -f $state/slurm.conf ]]; then
        SLURM_CONF=$state/slurm.conf scancel --full --quiet --partition=debug 2>/dev/null || true
    fi
    stop_pid "$state/slurmd.pid" slurmd
    stop_pid "$state/slurmctld.pid" slurmctld
    stop_pid "$state/munged.pid" munged
}

case $action in
    start) start ;;
    stop) stop ;;
    status)
        SLURM_CONF=$state/slurm.conf sinfo && SLURM_CONF=$state/slurm.conf squeue ;;
    *) die "usage: $0 start|stop|status [STATE_DIR]" ;;
esac
