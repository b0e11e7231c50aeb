#!/usr/bin/env bash
# A real single-node Slurm on this machine, for trying and testing the SLURM path (no systemd, no cgroups).
#   tools/slurm/local_cluster.sh up [STATE_DIR]     start munge, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   tools/slurm/local_cluster.sh down [STATE_DIR]   stop every daemon by its pid file
# Needs Debian's slurm-wlm, slurmctld, slurmd, slurm-client and munge packages, and root.
set -euo pipefail
cmd=${1:?usage: local_cluster.sh up|down [STATE_DIR]}
dir=${2:-/tmp/dino-slurm}
conf=$dir/slurm.conf
# munged runs as the munge user, which must reach its socket and log: keep them out of (possibly private) $dir.
munge_dir=/tmp/dino-munge-$(echo "$dir" | md5sum | cut -c1-10)

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$munge_dir/munged.pid"; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

if [ "$cmd" = down ]; then
  stop
  rm -rf "$munge_dir"
  exit 0
fi
[ "$cmd" = up ] || { echo "unknown command $cmd" >&2; exit 2; }
for tool in munged slurmctld slurmd sbatch scontrol; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install slurm-wlm slurmctld slurmd slurm-client munge" >&2; exit 3; }
done
stop
mkdir -p "$dir/state" "$dir/spool" "$munge_dir"
chown munge:munge "$munge_dir"
chmod 755 "$munge_dir"  # munged requires the socket directory to be searchable by all
memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > "$conf" <<CONF
ClusterName=dino-local
SlurmctldHost=localhost
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket.2
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
runuser -u munge -- munged --socket="$munge_dir/munge.socket.2" --pid-file="$munge_dir/munged.pid" \
  --log-file="$munge_dir/munged.log"
slurmctld -f "$conf"
slurmd -f "$conf" -N localhost
export SLURM_CONF=$conf
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -q idle; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.5
done
echo "slurm did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
