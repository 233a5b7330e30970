#!/usr/bin/env bash
# A single-node SLURM on this machine (munge + slurmctld + slurmd, no cgroups, no accounting), for trying the
# sbatch scripts and for tests. Needs root and the Debian packages slurm-wlm and munge.
#   cluster/slurm/local_cluster.sh start DIR    # state, logs and slurm.conf under DIR; prints the SLURM_CONF to export
#   cluster/slurm/local_cluster.sh stop DIR
set -euo pipefail
action=${1:?start|stop}
dir=$(mkdir -p "${2:?state directory}" && cd "$2" && pwd)
conf=$dir/slurm.conf

if [ "$action" = stop ]; then
  for name in slurmd slurmctld munged; do
    [ -f "$dir/$name.pid" ] && kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
  done
  exit 0
fi

host=$(hostname -s)
cpus=${EBWM_SLURM_CPUS:-$(nproc)}
mkdir -p "$dir/spool/ctld" "$dir/spool/d" /run/munge /var/log/munge /var/lib/munge /etc/munge
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
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -x munged > /dev/null; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$dir/munged.pid"
fi
SLURM_CONF=$conf slurmctld -i
SLURM_CONF=$conf slurmd
for _ in $(seq 60); do
  if SLURM_CONF=$conf sinfo -h -o %T 2>/dev/null | grep -q idle; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
