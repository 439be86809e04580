#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (CI: tests/test_slurm.py submits real jobs to it).
#
# Idempotent: a cluster this script started and that still answers is left as it is. As root,
# installs what is missing (apt-get: slurm-wlm, munge, and for `sacct`, which submitit polls for
# job states: slurmdbd and mariadb-server), writes a munge key, a minimal slurm.conf (one node
# with this machine's CPUs and memory, one partition, short timeouts) and slurmdbd.conf, starts
# munged, MariaDB, slurmdbd, slurmctld and slurmd, and waits until `sinfo` shows the node idle.
# It never overwrites a slurm.conf it did not write (a real cluster's). Exit status 0: the
# cluster answers; otherwise the last line says why. Stop it with .ci/slurm-down.sh.
set -euo pipefail

MARK="# written by wsss-bench .ci/slurm-up.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
STATE=/var/lib/slurm-wsss
LOGS=/var/log/slurm-wsss
CLUSTER=wsss-ci
PARTITION=${WSSS_SLURM_PARTITION:-debug}
DB_SOCKET=/run/mysqld/mysqld.sock

die() { echo "slurm-up: $*" >&2; exit 1; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

[ "$(id -u)" = 0 ] || die "needs root (installs packages and starts daemons)"

if grep -qF "$MARK" "$CONF" 2>/dev/null && running /run/slurmctld.pid && running /run/slurmd.pid \
  && [ "$(node_state)" = idle ] && sacct -n -X -o JobID >/dev/null 2>&1; then
  echo "slurm-up: cluster already up ($(sinfo -h -o '%P %D %T' | head -1))"
  exit 0
fi

# ---- packages --------------------------------------------------------------------------------
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge \
  slurmdbd:slurmdbd mariadbd:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${need[*]} and no apt-get to install them"
  echo "slurm-up: apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      slurm-wlm slurmdbd munge mariadb-server >/dev/null; } \
    || die "apt-get install ${need[*]} failed"
fi

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script (a real cluster?); not touching it"
fi

# ---- munge -----------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! running /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge)"
fi
munge -n | unmunge >/dev/null || die "munge does not round-trip a credential"

# ---- MariaDB + slurmdbd (sacct: submitit reads job states with it) ----------------------------
install -d -m 0755 "$STATE" "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
install -d -o mysql -g mysql -m 0755 /run/mysqld
if [ ! -d /var/lib/mysql/mysql ]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null || die "mariadb-install-db failed"
fi
if ! [ -S "$DB_SOCKET" ] || ! mariadb-admin --socket="$DB_SOCKET" ping >/dev/null 2>&1; then
  (mariadbd-safe --datadir=/var/lib/mysql --socket="$DB_SOCKET" --skip-networking=0 \
     --bind-address=127.0.0.1 >"$LOGS/mariadb.out" 2>&1 &)
  for _ in $(seq 60); do mariadb-admin --socket="$DB_SOCKET" ping >/dev/null 2>&1 && break; sleep 0.5; done
  mariadb-admin --socket="$DB_SOCKET" ping >/dev/null 2>&1 || die "MariaDB did not start ($LOGS/mariadb.out)"
fi
DB_PASS_FILE="$STATE/db-pass"
[ -s "$DB_PASS_FILE" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DB_PASS_FILE")
DB_PASS=$(cat "$DB_PASS_FILE")
mariadb --socket="$DB_SOCKET" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "cannot create the slurm DB user"

(umask 077; cat >"$DBD_CONF" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
)
chmod 0600 "$DBD_CONF"
if ! running /run/slurmdbd.pid; then
  /usr/sbin/slurmdbd || die "slurmdbd did not start ($LOGS/slurmdbd.log)"
fi
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done

# ---- slurm.conf ------------------------------------------------------------------------------
# the node line as slurmd itself detects it (CPUs, sockets, cores, memory): no INVAL mismatch
NODE=$(slurmd -C | head -1)
NODE_NAME=$(echo "$NODE" | sed -n 's/^NodeName=\([^ ]*\).*/\1/p')
[ -n "$NODE_NAME" ] || die "slurmd -C did not name this node"
cat >"$CONF" <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$NODE_NAME
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
Waittime=0
MinJobAge=300
$NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=120 State=UP
EOF
# cgroup plugins are off (proctrack/linuxproc, task/none); an empty cgroup.conf stops slurmd
# from probing cgroup v2 controllers that a container may not delegate
[ -f /etc/slurm/cgroup.conf ] || echo "$MARK" >/etc/slurm/cgroup.conf

if running /run/slurmctld.pid; then
  scontrol reconfigure >/dev/null 2>&1 || true
else
  /usr/sbin/slurmctld || die "slurmctld did not start ($LOGS/slurmctld.log)"
fi
if ! running /run/slurmd.pid; then
  /usr/sbin/slurmd || die "slurmd did not start ($LOGS/slurmd.log)"
fi

# ---- wait for the node ------------------------------------------------------------------------
for i in $(seq 120); do
  state=$(node_state)
  case "$state" in
    idle) break ;;
    down*|drain*|fail*) [ $((i % 10)) = 0 ] && scontrol update nodename="$NODE_NAME" state=resume ;;
  esac
  sleep 0.5
done
[ "$(node_state)" = idle ] || die "node $NODE_NAME is '$(node_state)', not idle, after 60 s ($LOGS)"
sacct -n -X -o JobID >/dev/null || die "sacct does not answer (slurmdbd: $LOGS/slurmdbd.log)"
echo "slurm-up: cluster $CLUSTER up: $(sinfo -h -o 'partition %P, %D node(s) %T, %c CPUs' | head -1)"
