#!/usr/bin/env bash
# Stop the cluster that local_cluster_up.sh started: cancel its jobs, then stop slurmd, slurmctld
# and (if that script started it and no other local cluster still runs) munged, each by the pid it
# recorded. Safe to run twice.
set -uo pipefail

DIR=${RAMP_SLURM_DIR:-/tmp/ramp-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf

say() { echo "local-slurm | $*"; }

alive() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n $pid && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

stop() {  # stop PIDFILE NAME: SIGTERM, then SIGKILL after 10 s
    local pidfile=$1 name=$2 pid
    alive "$pidfile" "$name" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 100); do
        alive "$pidfile" "$name" || break
        sleep 0.1
    done
    alive "$pidfile" "$name" && kill -KILL "$pid"
    rm -f "$pidfile"
    say "stopped $name ($pid)"
}

if alive "$DIR/run/slurmctld.pid" slurmctld; then
    # Stopping slurmd leaves running steps behind: end the jobs first.
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086 # one job id per word
        scancel $jobs
        for _ in $(seq 150); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi
stop "$DIR/run/slurmd.pid" slurmd
stop "$DIR/run/slurmctld.pid" slurmctld
# Another local cluster started later may have reused this munged (the up script reuses one that
# answers): leave it to the last cluster running.
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    [[ -f $DIR/run/munged.pid ]] && say "left munged running: another local cluster uses it"
    rm -f "$DIR/run/munged.pid"
else
    stop "$DIR/run/munged.pid" munged
fi
