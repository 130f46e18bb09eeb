#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests (tests/test_slurm.py):
#
#   sudo scripts/slurm_local.sh up     # install slurm-wlm + munge if absent, write slurm.conf, start
#   sudo scripts/slurm_local.sh down   # stop the daemons this script started
#
# slurmctld and slurmd run as root on localhost with one partition ("local", the default)
# holding this node with its real CPU count and memory (from `slurmd -C`). No cgroups, no
# accounting: jobs are tracked by process tree, so this works inside a container. State and
# spool live under /var/spool/slurm-local. `up` is idempotent: running daemons are kept
# (restarted only when slurm.conf changed). Debian/Ubuntu only (apt-get); needs root.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-local
RUN=/run/slurm-local
MARK="# written by scripts/slurm_local.sh"

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        say "slurm $(slurmctld -V | cut -d' ' -f2) and munge already installed"
        return
    fi
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    say "installed slurm $(slurmctld -V | cut -d' ' -f2)"
}

write_conf() {
    local host node
    host=$(hostname -s)
    # slurmd -C: "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=<MB>"
    node=$(slurmd -C | head -n1)
    [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real cluster's config"
    fi
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$RUN"
    local new
    new=$(cat <<EOF
$MARK: a one-node cluster on this machine
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits this credential lifetime before it starts again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups (containers rarely allow them): processes are tracked by their parent chain.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Scheduling passes every few seconds, so a requeued job starts soon after it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Jobs may be requeued (scontrol requeue, Lightning's auto-requeue on the warning signal).
JobRequeue=1
# SIGTERM, then SIGKILL this many seconds later: time for a checkpoint at the current step.
KillWait=30
MinJobAge=600
$node NodeAddr=127.0.0.1
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
        say "$CONF is up to date ($node)"
        return 1
    fi
    printf '%s\n' "$new" >"$CONF"
    say "wrote $CONF ($node)"
    return 0
}

start_munge() {
    if alive /run/munge/munged.pid; then
        say "munged already running (pid $(cat /run/munge/munged.pid))"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; say "created /etc/munge/munge.key"; }
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- munged
    say "started munged (pid $(cat /run/munge/munged.pid))"
}

stop() {  # stop <name>: the daemon whose pid file this script's slurm.conf names
    local pidfile=$RUN/$1.pid
    if alive "$pidfile"; then
        local pid
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        say "stopped $1 (pid $pid)"
    fi
}

wait_idle() {  # until the node takes jobs
    local host state
    host=$(hostname -s)
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
        case $state in
            idle|mix|alloc|comp) say "node $host is $state; partition: $(sinfo -h -o '%P %D nodes %c cpus %m MB')"; return;;
            drain*|down*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true;;  # left over from an earlier run
        esac
        sleep 0.2
    done
    die "node $host did not become idle (state '${state:-none}'); see $STATE/slurmctld.log and $STATE/slurmd.log"
}

up() {
    [[ $(id -u) == 0 ]] || die "needs root (installs packages, starts daemons)"
    install_packages
    local changed=0
    if write_conf; then changed=1; fi
    start_munge
    if (( changed )); then stop slurmd; stop slurmctld; fi
    if alive $RUN/slurmctld.pid; then say "slurmctld already running (pid $(cat $RUN/slurmctld.pid))"
    else slurmctld; sleep 0.5; alive $RUN/slurmctld.pid || die "slurmctld did not start; see $STATE/slurmctld.log"; say "started slurmctld (pid $(cat $RUN/slurmctld.pid))"; fi
    if alive $RUN/slurmd.pid; then say "slurmd already running (pid $(cat $RUN/slurmd.pid))"
    else slurmd; sleep 0.5; alive $RUN/slurmd.pid || die "slurmd did not start; see $STATE/slurmd.log"; say "started slurmd (pid $(cat $RUN/slurmd.pid))"; fi
    wait_idle
}

down() {
    stop slurmd
    stop slurmctld
    if alive /run/munge/munged.pid; then
        local pid
        pid=$(cat /run/munge/munged.pid)
        kill "$pid"
        say "stopped munged (pid $pid)"
    fi
    say "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
