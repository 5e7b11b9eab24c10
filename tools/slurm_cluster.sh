#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests (tests/test_cluster.py) and for trying
# examples/launch_nemo_run.py --executor slurm by hand. Needs root; no systemd.
#
#   tools/slurm_cluster.sh install   # apt: slurm-wlm munge slurmdbd mariadb-server (if missing)
#   tools/slurm_cluster.sh start     # install if needed, configure, start; idempotent
#   tools/slurm_cluster.sh status    # exit 0 when jobs can be submitted and accounted
#   tools/slurm_cluster.sh stop      # stop the daemons THIS script started (nothing else)
#
# What it runs (directly: PID 1 is not an init here):
#   munged     the munge key /etc/munge/munge.key, mode 0400, owned by munge
#   mariadbd   a private database under $VIGOS_SLURM_DIR/mysql (TCP on 127.0.0.1:$VIGOS_SLURM_DB_PORT)
#   slurmdbd   accounting: sacct (NeMo-Run polls job states with it)
#   slurmctld, slurmd
#                /etc/slurm/slurm.conf written by this script (it refuses to overwrite one it did
#                not write): NodeName from `hostname -s`, CPUs and memory from `slurmd -C`,
#                ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no GRES, KillWait
#                $VIGOS_SLURM_KILL_WAIT s (default 5: scancel's SIGKILL follows its SIGTERM fast)
# The daemons' logs and pid files are in $VIGOS_SLURM_DIR (default /var/tmp/vigos-slurm).
set -euo pipefail

STATE="${VIGOS_SLURM_DIR:-/var/tmp/vigos-slurm}"
DB_PORT="${VIGOS_SLURM_DB_PORT:-3307}"
KILL_WAIT="${VIGOS_SLURM_KILL_WAIT:-5}"
CLUSTER=vigos
MARK="# written by vigos-megatron tools/slurm_cluster.sh"
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

say() { echo "slurm_cluster: $*" >&2; }
die() { say "$*"; exit 1; }
need_root() { [[ "$(id -u)" == 0 ]] || die "needs root (it installs packages and starts system daemons)"; }

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null && command -v sacct >/dev/null
}

do_install() {
  installed && return 0
  need_root
  say "installing ${PACKAGES[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no daemon may start from the package scripts (there is no init anyway)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
  installed || die "the packages did not install slurmctld/slurmd/munged/slurmdbd/mariadbd"
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

started_by_us() { echo "$1" >> "$STATE/started"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t="$1" what="$2"; shift 2
  for ((i = 0; i < t * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  die "$what did not come up in ${t}s (logs in $STATE)"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force --keyfile /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  started_by_us /run/munge/munged.pid
  wait_for 10 munged sh -c 'munge -n | unmunge'
}

db() { mariadb --protocol=socket --socket="$STATE/mysql.sock" -uroot "$@"; }

start_db() {
  if alive "$STATE/mysql.pid" && db -e 'select 1' >/dev/null 2>&1; then return 0; fi
  if [[ ! -d "$STATE/mysql/mysql" ]]; then
    install -d -o mysql -g mysql "$STATE/mysql"
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/mysql-install.log" 2>&1 || die "mariadb-install-db failed ($STATE/mysql-install.log)"
  fi
  chown mysql:mysql "$STATE"
  mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$STATE/mysql.sock" --pid-file="$STATE/mysql.pid" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$STATE/mysql.log" --innodb-buffer-pool-size=64M \
    >/dev/null 2>&1 &
  disown
  wait_for 60 mariadbd db -e 'select 1'
  started_by_us "$STATE/mysql.pid"
  db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'vigos';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'vigos';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

write_configs() {
  local host node
  host="$(hostname -s)"
  node="$(slurmd -C | head -1)"  # NodeName=<host> CPUs=... RealMemory=...
  [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line"
  if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: not touching it"
  fi
  install -d /etc/slurm "$STATE/ctld" "$STATE/d"
  cat > "$CONF" <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=$KILL_WAIT
MinJobAge=3600
InactiveLimit=0
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DBD_CONF" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=vigos
StorageLoc=slurm_acct_db
EOF
  chmod 0600 "$DBD_CONF"
}

status() {
  scontrol ping 2>/dev/null | grep -q UP || return 1
  sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)' || return 1
  sacct -n -X -S now-1minutes >/dev/null 2>&1 || return 1
}

do_start() {
  need_root
  do_install
  mkdir -p "$STATE"
  touch "$STATE/started"
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && status; then
    say "already running (sinfo: $(sinfo -h -o '%P %D %T'))"
    return 0
  fi
  start_munge
  start_db
  write_configs
  if ! alive "$STATE/slurmdbd.pid"; then
    slurmdbd
    started_by_us "$STATE/slurmdbd.pid"
  fi
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  if ! alive "$STATE/slurmctld.pid"; then
    slurmctld
    started_by_us "$STATE/slurmctld.pid"
  fi
  wait_for 60 slurmctld sh -c 'scontrol ping | grep -q UP'
  if ! alive "$STATE/slurmd.pid"; then
    slurmd
    started_by_us "$STATE/slurmd.pid"
  fi
  wait_for 60 "the node" sh -c "sinfo -h -o %T | grep -Eqv 'unknown|down|drain|not_responding'"
  scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
  wait_for 60 "accounting (sacct)" status
  say "running: $(sinfo -h -o '%P %D %T %c CPUs'); logs in $STATE"
}

do_stop() {
  [[ -f "$STATE/started" ]] || { say "nothing started by this script"; return 0; }
  local pidfile pid
  # reverse order of starting: slurmd, slurmctld, slurmdbd, mariadbd, munged
  while read -r pidfile; do
    [[ -n "$pidfile" ]] || continue
    if alive "$pidfile"; then
      pid="$(cat "$pidfile")"
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      say "stopped $(basename "$pidfile" .pid) ($pid)"
    fi
  done < <(tac "$STATE/started")
  rm -f "$STATE/started"
}

case "${1:-}" in
  install) need_root; do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) if status; then say "up: $(sinfo -h -o '%P %D %T')"; else say "not running"; exit 1; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
