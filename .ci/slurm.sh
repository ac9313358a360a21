# A real single-node SLURM for the tests (tests/test_slurm.py reads MAE_LAB_TEST_SLURM and SLURM_CONF).
# Source it from bash (.ci/run does): `. .ci/slurm.sh; start_slurm` and `stop_slurm` on exit. It installs Debian's
# slurmctld, slurmd and slurm-client if sbatch is missing, writes a slurm.conf for this one node under a temp folder
# (no munge, no accounting database, no cgroups), starts `slurmctld -D` and `slurmd -D` in the background, waits
# until the node is idle and exports SLURM_CONF and MAE_LAB_TEST_SLURM=1. stop_slurm stops exactly those two PIDs
# and deletes the folder. Needs root (slurmd starts job steps as their user). Ports: two free loopback ports picked
# by the kernel, or MAE_LAB_SLURM_PORT (the controller; the node daemon takes the next one).

start_slurm() {
  if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null; then
    echo "installing SLURM (Debian's slurmctld slurmd slurm-client)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null
  fi
  SLURM_DIR="$(mktemp -d /tmp/mae-lab-slurm.XXXXXX)"
  local ports port dport host node
  ports="$(python3 -c 'import socket; s = [socket.socket() for _ in "ab"]; [x.bind(("127.0.0.1", 0)) for x in s]
print(*(x.getsockname()[1] for x in s))')"
  port="${MAE_LAB_SLURM_PORT:-${ports% *}}"
  dport="$([ -n "${MAE_LAB_SLURM_PORT:-}" ] && echo $((port + 1)) || echo "${ports#* }")"
  host="$(hostname -s)"
  node="$(slurmd -C | head -n 1 | sed -E "s/^NodeName=[^ ]+ //; s/ UpTime=.*//")"  # CPUs=... RealMemory=...
  mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool"
  cat >"$SLURM_DIR/slurm.conf" <<EOF
ClusterName=maelab
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$dport
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/slurmctld.log
SlurmdLogFile=$SLURM_DIR/slurmd.log
ReturnToService=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=$host $node State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  export SLURM_CONF="$SLURM_DIR/slurm.conf"
  slurmctld -D -i -f "$SLURM_CONF" >"$SLURM_DIR/slurmctld.out" 2>&1 &
  SLURMCTLD_PID=$!
  slurmd -D -f "$SLURM_CONF" >"$SLURM_DIR/slurmd.out" 2>&1 &
  SLURMD_PID=$!
  local i
  for i in $(seq 1 60); do
    [ "$(sinfo -h -n "$host" -o %T 2>/dev/null | sort -u)" = idle ] && break
    sleep 1
  done
  if [ "$(sinfo -h -n "$host" -o %T 2>/dev/null | sort -u)" != idle ]; then
    echo "SLURM did not come up; its logs:" >&2
    tail -n 20 "$SLURM_DIR"/*.log "$SLURM_DIR"/*.out >&2 || true
    return 1
  fi
  export MAE_LAB_TEST_SLURM=1
  echo "SLURM $(sinfo -V | awk '{print $2}') for the tests: node $host idle after ${i}s, SLURM_CONF=$SLURM_CONF"
}

stop_slurm() {
  local pid
  for pid in ${SLURMD_PID:-} ${SLURMCTLD_PID:-}; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in ${SLURMD_PID:-} ${SLURMCTLD_PID:-}; do
    wait "$pid" 2>/dev/null || true
  done
  [ -n "${SLURM_DIR:-}" ] && rm -rf "$SLURM_DIR"
  return 0
}
