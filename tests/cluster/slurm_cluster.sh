#!/bin/bash
# A private Slurm cluster for tests and for trying the sbatch scripts on one machine (as root).
# Config, munge key and socket, state, spool, logs and pid files all live under DIR; nothing is
# written to /etc or /var (two nodes add namespaces under /run/netns while they run), and the
# one-node cluster listens on free ports, so it cannot clash with a real Slurm or another test run.
#
#   tests/cluster/slurm_cluster.sh start DIR      # one node: this host, on 127.0.0.1
#   tests/cluster/slurm_cluster.sh start DIR 2    # two nodes, node1 and node2, each in its own
#                                                 # network namespace joined by a veth pair
#   tests/cluster/slurm_cluster.sh exec DIR node2 CMD...   # run CMD "on" a namespaced node
#   tests/cluster/slurm_cluster.sh stop DIR       # cancel jobs, stop every daemon, remove netns
#
# After `start`, point the Slurm commands at the cluster with `export SLURM_CONF=DIR/slurm.conf`.
# On a two-node cluster the controller lives on node1: run the commands there
# (`slurm_cluster.sh exec DIR node1 sbatch ...`). A namespaced node has its own hostname (node1,
# node2) and /etc/hosts (the private addresses 10.217.0.1 and .2); a job's processes inherit them
# from that node's slurmd.
#
# `stop` is idempotent and safe after a failed `start`: it stops what the pid files name, then
# ends whatever still runs with this cluster's SLURM_CONF or inside its namespaces.
set -Eeuo pipefail

usage() {
    sed -n '2,20p' "$0" >&2
    exit 2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---- namespaces ---------------------------------------------------------------------------------
netns_name() { echo "salt-$(cat "$1/netns_id")-$2"; }

# exec_on DIR NODE CMD...: CMD in NODE's network namespace, with its own hostname and /etc/hosts.
exec_on() {
    local dir=$1 node=$2
    shift 2
    if [[ ! -f "$dir/netns_id" ]]; then
        exec "$@"
    fi
    # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mount slurmd needs.
    # shellcheck disable=SC2016  # expanded by the inner sh
    exec nsenter --net="/run/netns/$(netns_name "$dir" "$node")" unshare --uts --mount -- \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
        sh "$dir/hosts" "$node" "$@"
}

make_netns() {
    local dir=$1 nodes=$2 id a b
    id=$(printf '%05d' $((RANDOM % 100000)))
    while ip netns list | grep -q "^salt-$id-"; do
        id=$(printf '%05d' $((RANDOM % 100000)))
    done
    echo "$id" >"$dir/netns_id"
    printf '127.0.0.1 localhost\n' >"$dir/hosts"
    for ((i = 1; i <= nodes; i++)); do
        ip netns add "$(netns_name "$dir" "node$i")"
        netns_name "$dir" "node$i" >>"$dir/netns" # created here: `stop` removes exactly these
        ip -n "$(netns_name "$dir" "node$i")" link set lo up
        printf '10.217.0.%d node%d\n' "$i" "$i" >>"$dir/hosts"
    done
    # Two nodes: one veth pair, renamed eth0 on both sides.
    a=$(netns_name "$dir" node1)
    b=$(netns_name "$dir" node2)
    ip link add "s${id}a" type veth peer name "s${id}b"
    ip link set "s${id}a" netns "$a"
    ip link set "s${id}b" netns "$b"
    ip -n "$a" link set "s${id}a" name eth0
    ip -n "$b" link set "s${id}b" name eth0
    ip -n "$a" addr add 10.217.0.1/24 dev eth0
    ip -n "$b" addr add 10.217.0.2/24 dev eth0
    ip -n "$a" link set eth0 up
    ip -n "$b" link set eth0 up
}

# ---- config -------------------------------------------------------------------------------------
write_conf() {
    local dir=$1 nodes=$2 host ctld_port slurmd_port
    if [[ $nodes == 1 ]]; then
        host=$(hostname -s)
        ctld_port=$(free_port)
        slurmd_port=$(free_port)
        while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
    else
        host=node1
        ctld_port=6817 # the namespaces are private: Slurm's own ports
        slurmd_port=6818
    fi
    cat >"$dir/slurm.conf" <<EOF
ClusterName=salttest
SlurmctldHost=$host($([[ $nodes == 1 ]] && echo 127.0.0.1 || echo 10.217.0.1))
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2,batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
EOF
    if [[ $nodes == 1 ]]; then
        echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN" >>"$dir/slurm.conf"
    else
        for ((i = 1; i <= nodes; i++)); do
            echo "NodeName=node$i NodeAddr=10.217.0.$i CPUs=1 State=UNKNOWN" >>"$dir/slurm.conf"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
    : >"$dir/plugstack.conf"
}

start_munge() {
    local dir=$1 up
    mkdir -p "$dir/munge"
    chmod 755 "$dir" "$dir/munge" # munged wants its socket's directories searchable by all
    up=$dir
    while [[ $up != / ]]; do
        up=$(dirname "$up")
        if [[ $(stat -c %A "$up") != *[xt] ]]; then
            echo "slurm_cluster: munged needs $up searchable by all (chmod o+x $up)" >&2
            return 1
        fi
    done
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
}

wait_idle() {
    local dir=$1 nodes=$2 state
    for _ in $(seq 150); do
        state=$(SLURM_CONF=$dir/slurm.conf exec_on_node1 "$dir" sinfo -h -N -o %t 2>/dev/null || true)
        if [[ $(grep -c '^idle$' <<<"$state") == "$nodes" ]]; then
            return 0
        fi
        sleep 0.2
    done
    echo "slurm_cluster: nodes not idle after 30 s (sinfo: ${state:-no answer}); logs in $dir/log" >&2
    return 1
}

exec_on_node1() { (exec_on "$1" node1 "${@:2}"); }

start() {
    local dir=$1 nodes=${2:-1}
    [[ $nodes == 1 || $nodes == 2 ]] || { echo "slurm_cluster: 1 or 2 nodes" >&2; exit 2; }
    [[ $(id -u) == 0 ]] || { echo "slurm_cluster: needs root" >&2; exit 3; }
    for bin in munged slurmctld slurmd sinfo sbatch; do
        command -v "$bin" >/dev/null || { echo "slurm_cluster: $bin not found (apt-get install slurm-wlm munge)" >&2; exit 3; }
    done
    if [[ $nodes == 2 ]]; then
        command -v ip >/dev/null || { echo "slurm_cluster: ip not found (apt-get install iproute2)" >&2; exit 3; }
    fi
    mkdir -p "$dir"/{state,spool,run,log}
    dir=$(cd "$dir" && pwd)
    trap 'echo "slurm_cluster: start failed; stopping what started (logs in $dir/log)" >&2; stop "$dir"; exit 1' ERR
    [[ $nodes == 2 ]] && make_netns "$dir" "$nodes"
    write_conf "$dir" "$nodes"
    start_munge "$dir"
    export SLURM_CONF=$dir/slurm.conf
    exec_on_node1 "$dir" slurmctld -f "$SLURM_CONF"
    if [[ $nodes == 1 ]]; then
        mkdir -p "$dir/spool/$(hostname -s)"
        slurmd -f "$SLURM_CONF" -N "$(hostname -s)"
    else
        for ((i = 1; i <= nodes; i++)); do
            mkdir -p "$dir/spool/node$i"
            (exec_on "$dir" "node$i" slurmd -f "$SLURM_CONF" -N "node$i")
        done
    fi
    wait_idle "$dir" "$nodes"
    echo "slurm_cluster: $nodes node(s) idle; export SLURM_CONF=$SLURM_CONF"
}

# ---- stop ---------------------------------------------------------------------------------------
# stop_pids FILE...: SIGTERM the daemons named by the pid files, wait up to 10 s, then SIGKILL.
stop_pids() {
    local file pid pids=() alive=()
    for file in "$@"; do
        [[ -f "$file" ]] || continue
        pids+=("$(cat "$file")")
        rm -f "$file"
    done
    [[ ${#pids[@]} -gt 0 ]] || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 100); do
        alive=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        [[ ${#alive[@]} -gt 0 ]] || return 0
        sleep 0.1
    done
    kill -9 "${alive[@]}" 2>/dev/null || true
}

# Pids of processes started for this cluster: jobs carry its SLURM_CONF in their environment.
cluster_pids() {
    local conf=$1 env_file pid
    for env_file in /proc/[0-9]*/environ; do
        pid=${env_file#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" ]] && continue
        if { tr "\0" "\n" <"$env_file"; } 2>/dev/null | grep -qxF "SLURM_CONF=$conf"; then
            echo "$pid"
        fi
    done
}

stop() {
    local dir=$1 jobs ns pids
    [[ -d "$dir" ]] || return 0
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    if [[ -f "$dir/run/slurmctld.pid" ]]; then
        jobs=$(exec_on_node1 "$dir" squeue -h -o %i 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086  # one job id per word
            exec_on_node1 "$dir" scancel --full $jobs 2>/dev/null || true
            for _ in $(seq 50); do
                [[ -z "$(exec_on_node1 "$dir" squeue -h -o %i 2>/dev/null || true)" ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_pids "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid"
    stop_pids "$dir/run/munged.pid"
    pids=$(cluster_pids "$SLURM_CONF")
    if [[ -n "$pids" ]]; then
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
    fi
    if [[ -f "$dir/netns" ]]; then
        while read -r ns; do
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            # shellcheck disable=SC2086
            [[ -z "$pids" ]] || kill -9 $pids 2>/dev/null || true
            ip netns del "$ns" 2>/dev/null || true
        done <"$dir/netns"
        rm -f "$dir/netns"
    fi
}

case "${1:-}" in
start) [[ $# -ge 2 ]] || usage; start "$2" "${3:-1}" ;;
stop) [[ $# -eq 2 ]] || usage; stop "$2" ;;
exec) [[ $# -ge 4 ]] || usage; exec_on "$(cd "$2" && pwd)" "$3" "${@:4}" ;;
*) usage ;;
esac
