#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for trying ramp's Slurm path and for its tests.
#
#   launch/slurm/local_cluster_up.sh      # prints `export SLURM_CONF=...`; then sbatch, squeue, ...
#   launch/slurm/local_cluster_down.sh    # cancels its jobs and stops the daemons by pid
#
# Idempotent: installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing
# (apt-get, as root), writes slurm.conf with every state, spool, pid and log path under one folder,
# and starts whichever of munged, slurmctld and slurmd is not already running. Needs root: slurmd
# runs jobs as the submitting user. There is no systemd here, so the daemons are started directly.
#
# Environment:
#   RAMP_SLURM_DIR   the cluster's folder (default /tmp/ramp-slurm)
#   RAMP_SLURM_PORT  slurmctld's port; slurmd listens on the next one (default 6817)
#
# Exit status 3 means Slurm cannot be had on this machine (no root, no apt-get, or the packages
# are unavailable); any other failure is a real error.
set -euo pipefail

DIR=${RAMP_SLURM_DIR:-/tmp/ramp-slurm}
PORT=${RAMP_SLURM_PORT:-6817}
CONF=$DIR/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local-slurm | $*"; }
unavailable() { say "Slurm unavailable: $*" >&2; exit 3; }

alive() {  # alive PIDFILE NAME: the pid in PIDFILE is a running NAME (not a recycled pid)
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n $pid && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

install_packages() {
    local missing=0 tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || unavailable "no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (apt-get, about 10 s)"
    # Debian's recommends would pull in about 40 more packages; none is needed here.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null ||
        unavailable "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
        >/dev/null || unavailable "apt-get install ${PACKAGES[*]} failed"
}

resolve_hostname() {
    # slurmctld and slurmd find each other by the short hostname.
    local host
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$DIR/run/munged.pid"  # ours to stop
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    say "munged does not answer" >&2
    exit 1
}

write_config() {
    local node proctrack=proctrack/cgroup
    # The node exactly as slurmd sees it; giving only CPUs= makes it complain about core boundaries.
    node=$(slurmd -C | head -n 1)
    # cgroup tracking signals and kills every process of a step; it needs the cgroup v1 freezer.
    # Without one, linuxproc follows the process tree instead (a process that leaves it is missed).
    if [[ ! -d /sys/fs/cgroup/freezer ]]; then
        proctrack=proctrack/linuxproc
        say "no cgroup v1 freezer: tracking job processes with $proctrack"
    fi
    cat >"$CONF" <<CONF
# Written by launch/slurm/local_cluster_up.sh: a one-node cluster on localhost.
ClusterName=ramp-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
# A requeued job may start once its credential expires: 10 s instead of the default 121 s.
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=$proctrack
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, one job takes the node's whole memory and a second one waits.
DefMemPerCPU=1000
KillWait=5
ReturnToService=2
SchedulerType=sched/backfill
# Pending jobs are looked at every 2 s (default 60 s, backfill 30 s): a requeued job starts as soon as
# its BeginTime passes rather than at the next pass.
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    echo "CgroupPlugin=cgroup/v1" >"$DIR/etc/cgroup.conf"
}

wait_for_idle_node() {
    local state
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1) || true
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            down* | drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    say "the node did not come up; see $DIR/log/" >&2
    exit 1
}

((EUID == 0)) || unavailable "needs root (slurmd starts jobs as their users)"
install_packages
mkdir -p "$DIR"/{etc,state,spool,run,log}
resolve_hostname
start_munge
write_config
export SLURM_CONF=$CONF
if alive "$DIR/run/slurmctld.pid" slurmctld; then
    say "slurmctld already running"
else
    slurmctld -f "$CONF"
fi
if alive "$DIR/run/slurmd.pid" slurmd; then
    say "slurmd already running"
else
    slurmd -f "$CONF"
fi
wait_for_idle_node
say "up: $(sinfo -h -N -o '%N %c CPUs %m MB %T')"
echo "export SLURM_CONF=$CONF"
