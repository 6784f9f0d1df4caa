#!/usr/bin/env bash
# A local PostgreSQL from Debian's packages for the tests (the quota ledger on PostgreSQL).
# Idempotent: installs postgresql only if missing, creates the cluster "workbench" once
# (loopback only, port $WORKBENCH_PG_PORT, default 54329), starts it if it is down, makes the
# role and database "workbench_test" (the role may create databases: tests make their own),
# then prints the URL on stdout, e.g.
#   postgresql://workbench_test:<password>@127.0.0.1:54329/workbench_test
# The password is generated once and kept in /etc/postgresql/<version>/workbench/test-password (0600).
# Needs root (apt-get, and pg_ctlcluster / psql run as the postgres user). No systemd needed.
set -euo pipefail
PORT=${WORKBENCH_PG_PORT:-54329}
CLUSTER=${WORKBENCH_PG_CLUSTER:-workbench}
NAME=${WORKBENCH_PG_NAME:-workbench_test}   # role and database
log() { echo "[postgres] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "needs root (it installs postgresql and runs the cluster as the postgres user);"
  log "or point the tests at a server of yours with WORKBENCH_TEST_POSTGRES_URL=postgresql://user:pw@host:port/db"
  exit 1
fi

if ! command -v pg_createcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  log "installing postgresql (Debian's packages) …"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
VER=$(ls /usr/lib/postgresql | sort -V | tail -1)
CONF=/etc/postgresql/$VER/$CLUSTER

cluster_field() {  # field N of our cluster's line in pg_lsclusters (3: port, 4: status)
  pg_lsclusters -h | awk -v v="$VER" -v c="$CLUSTER" -v f="$1" '$1 == v && $2 == c {print $f}'
}

if [ -z "$(cluster_field 2)" ]; then
  log "creating cluster $VER/$CLUSTER on 127.0.0.1:$PORT …"
  pg_createcluster "$VER" "$CLUSTER" -p "$PORT" -- --auth-local=peer --auth-host=scram-sha-256 >/dev/null
fi
PORT=$(cluster_field 3)
if [ "$(cluster_field 4)" != online ]; then
  # (re)written at every start; listen_addresses stays Debian's default, 'localhost' (loopback only)
  mkdir -p "$CONF/conf.d"
  printf '%s\n' "# written by workbench scripts/postgres-up.sh" "max_connections = 200" > "$CONF/conf.d/workbench.conf"
  log "starting cluster $VER/$CLUSTER …"
  pg_ctlcluster "$VER" "$CLUSTER" start
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || { log "PostgreSQL on 127.0.0.1:$PORT does not answer"; exit 1; }

PWFILE=$CONF/test-password
if [ ! -s "$PWFILE" ]; then
  (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$PWFILE")
fi
PASSWORD=$(cat "$PWFILE")

psql_admin() { runuser -u postgres -- psql -h /var/run/postgresql -p "$PORT" -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_admin -d postgres -c "DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$NAME') THEN CREATE ROLE $NAME; END IF;
END \$\$;" >/dev/null
psql_admin -d postgres -c "ALTER ROLE $NAME WITH LOGIN CREATEDB PASSWORD '$PASSWORD';" >/dev/null
if [ "$(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$NAME'")" != 1 ]; then
  psql_admin -d postgres -c "CREATE DATABASE $NAME OWNER $NAME;" >/dev/null
fi
echo "postgresql://$NAME:$PASSWORD@127.0.0.1:$PORT/$NAME"
