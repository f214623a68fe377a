#!/bin/bash
# A real one-node SLURM cluster on this machine, for testing the job scripts (tests/test_slurm_real.py).
#
#   scripts/slurm_local.sh up      # install the Debian packages if missing, start munge + slurmctld + slurmd
#   scripts/slurm_local.sh status  # prints the cluster's sinfo; exit 1 if it is not up
#   scripts/slurm_local.sh env     # prints `export SLURM_CONF=...` for the shell that submits jobs
#   scripts/slurm_local.sh down    # stop the daemons (the state folder stays, for the logs)
#
# Needs root (it starts daemons and, when missing, runs apt-get). It never touches the system's own
# /etc/slurm/slurm.conf: the configuration lives in $SLURM_LOCAL_DIR (default /var/tmp/revjepa-slurm)
# and clients find it through SLURM_CONF. One CPU-only partition `cpu` (no GRES) holding this host,
# with all its CPUs; memory is not a consumable resource, so --mem only has to fit the node.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/tmp/revjepa-slurm}
CONF="$STATE/slurm.conf"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "slurm_local: $*" >&2; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing ${missing[*]} and cannot install them (needs root and apt-get)"
        exit 1
    fi
    log "installing ${PACKAGES[*]}"
    # apt's lists may be absent on a fresh image; an update failure is fine if the install works
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge/munge.key
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged did not start"
    exit 1
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # slurmd refuses a node whose RealMemory is above what it measures: stay below it
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 9 / 10))
    mkdir -p "$STATE/ctld" "$STATE/d"
    cat >"$CONF" <<EOF
# written by scripts/slurm_local.sh
ClusterName=revjepa-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again once its old credential has expired: 10 s, not 120
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

daemon_running() {  # $1: pid file
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

up() {
    install_packages
    start_munge
    if daemon_running "$STATE/slurmctld.pid" && daemon_running "$STATE/slurmd.pid"; then
        log "already up ($CONF)"
    else
        down_quiet
        write_conf
        # -i: ignore state left by an earlier cluster of ours (jobs, node states)
        SLURM_CONF="$CONF" slurmctld -i
        SLURM_CONF="$CONF" slurmd
    fi
    for _ in $(seq 300); do
        if SLURM_CONF="$CONF" sinfo -h -o '%T' 2>/dev/null | grep -qx 'idle\|mixed\|allocated'; then
            log "up: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    log "the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log"
    SLURM_CONF="$CONF" sinfo >&2 || true
    exit 1
}

down_quiet() {
    for name in slurmd slurmctld; do
        local pidfile="$STATE/$name.pid"
        if daemon_running "$pidfile"; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            for _ in $(seq 100); do
                daemon_running "$pidfile" || break
                sleep 0.1
            done
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down_quiet; log "down" ;;
    status) SLURM_CONF="$CONF" sinfo ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: scripts/slurm_local.sh up|down|status|env" >&2; exit 2 ;;
esac
