#!/usr/bin/env bash
# A SLURM on this machine (munge + slurmctld + slurmd, no cgroups, no accounting), for trying the sbatch scripts and
# for tests. Needs root and the Debian packages slurm-wlm and munge. EBWM_SLURM_NODES=2 registers a second node,
# <host>-second, served by a second slurmd on this machine (its own port and spool; the name is added to /etc/hosts
# as 127.0.0.1), so multi-node jobs (--nodes 2) run here too. Debian's slurm is built without multiple-slurmd
# support, which only forbids two nodes with the same NodeHostname: each node gets its own.
#   cluster/slurm/local_cluster.sh start DIR    # state, logs and slurm.conf under DIR; prints the SLURM_CONF to export
#   cluster/slurm/local_cluster.sh stop DIR
set -euo pipefail
action=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)
conf=$dir/slurm.conf

if [ "$action" = stop ]; then
  for pid_file in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
  done
  exit 0
fi

host=$(hostname -s)
cpus=${EBWM_SLURM_CPUS:-$(nproc)}
nodes=$host
if [ "${EBWM_SLURM_NODES:-1}" = 2 ]; then
  nodes="$host $host-second"
  grep -q "[[:space:]]$host-second\b" /etc/hosts || echo "127.0.0.1 $host-second" >> /etc/hosts
fi
mkdir -p "$dir/spool/ctld" /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
cat > "$conf" <<CONF
ClusterName=ebwm-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
CONF
port=17001
for node in $nodes; do
  echo "NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 Port=$port CPUs=$cpus State=UNKNOWN" >> "$conf"
  mkdir -p "$dir/spool/d-$node"
  port=$((port + 1))
done
echo "PartitionName=debug Nodes=${nodes// /,} Default=YES MaxTime=INFINITE State=UP" >> "$conf"
if ! pgrep -x munged > /dev/null; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$dir/munged.pid"
fi
SLURM_CONF=$conf slurmctld -i
for node in $nodes; do
  SLURM_CONF=$conf slurmd -N "$node"
done
for _ in $(seq 60); do
  if [ "$(SLURM_CONF=$conf sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" = "$(echo $nodes | wc -w)" ]; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; see $dir/slurmctld.log and $dir/slurmd-*.log" >&2
exit 1
