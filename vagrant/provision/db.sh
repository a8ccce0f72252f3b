#!/bin/sh
# Provisions the database host `db`: PostgreSQL and MariaDB listening on the private network,
# a `lab` database on each with a `customers` table, and the engineer's account `ada` (a
# password login from the lab network: sluice relays the client's own authentication).
#
# Two ways to run, one script:
# - on a machine booted with systemd (Vagrant): the Debian services are configured
#   (conf.d files) and restarted;
# - without systemd as PID 1 (`cargo xtask lab`, inside the lab's `db` network namespace):
#   SLUICE_LAB_STATE names a directory where the same servers are initialised and started in
#   the background, listening on every address of the namespace.
# Either way the seed below is the same. Every wait is bounded.
set -eu

NET=${LAB_NET:-198.18.0.0/15}
STATE=${SLUICE_LAB_STATE:-}
PASSWORD=${LAB_PASSWORD:-ada-lab-password}
export DEBIAN_FRONTEND=noninteractive

missing=""
for p in postgresql mariadb-server mariadb-client; do
  dpkg-query -W -f '${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "db: installing$missing"
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq $missing
fi

# wait_for TRIES COMMAND...: runs COMMAND every half second until it succeeds.
wait_for() {
  tries=$1; shift
  while ! "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then echo "db: gave up waiting for: $*" >&2; return 1; fi
    sleep 0.5
  done
}

PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
HBA="host all all $NET scram-sha-256"

if [ -z "$STATE" ] && [ ! -d /run/systemd/system ]; then
  echo "db: no systemd here and no SLUICE_LAB_STATE: refusing to touch this host's servers" >&2
  exit 1
fi

if [ -z "$STATE" ]; then
  # The Debian services.
  PGCONF=$(ls -d /etc/postgresql/*/main | sort -V | tail -1)
  echo "listen_addresses = '*'" > "$PGCONF/conf.d/sluice-lab.conf"
  grep -qxF "$HBA" "$PGCONF/pg_hba.conf" || echo "$HBA" >> "$PGCONF/pg_hba.conf"
  printf '[mariadbd]\nbind-address = 0.0.0.0\n' > /etc/mysql/mariadb.conf.d/99-sluice-lab.cnf
  systemctl restart postgresql mariadb
  PGSOCK=/var/run/postgresql
  MYSOCK=/run/mysqld/mysqld.sock
else
  # The same servers, started by hand (no systemd here); they run until the lab removes the
  # namespace they run in.
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  PGDATA=$STATE/postgres PGSOCK=$STATE/pgsock MYDATA=$STATE/mariadb MYRUN=$STATE/myrun
  MYSOCK=$MYRUN/mysqld.sock
  mkdir -p "$PGDATA" "$PGSOCK" "$MYRUN" "$STATE/mytmp"
  chown postgres:postgres "$PGDATA" "$PGSOCK"
  chown mysql:mysql "$MYRUN" "$STATE/mytmp"
  runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust \
    --auth-host=reject >/dev/null
  echo "$HBA" >> "$PGDATA/pg_hba.conf"
  runuser -u postgres -- "$PGBIN/postgres" -D "$PGDATA" -k "$PGSOCK" \
    -c listen_addresses='*' -c fsync=off >"$STATE/postgres.log" 2>&1 &
  mariadb-install-db --no-defaults --datadir="$MYDATA" --user=mysql \
    --auth-root-authentication-method=socket --skip-test-db --tmpdir="$STATE/mytmp" \
    >"$STATE/mariadb-install-db.log" 2>&1
  mariadbd --no-defaults --datadir="$MYDATA" --socket="$MYSOCK" --user=mysql \
    --pid-file="$MYRUN/mariadbd.pid" --tmpdir="$STATE/mytmp" --bind-address=0.0.0.0 \
    --port=3306 --skip-log-bin --innodb-buffer-pool-size=32M >"$STATE/mariadbd.log" 2>&1 &
fi

wait_for 60 runuser -u postgres -- "$PGBIN/pg_isready" -q -h "$PGSOCK"
wait_for 60 mariadb-admin --no-defaults --socket="$MYSOCK" ping

# The seed: the same on both.
runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -h "$PGSOCK" -d postgres <<SQL
SET client_min_messages = warning;
DROP DATABASE IF EXISTS lab;
DROP ROLE IF EXISTS ada;
CREATE ROLE ada LOGIN PASSWORD '$PASSWORD';
CREATE DATABASE lab OWNER ada;
SQL
runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -h "$PGSOCK" -d lab <<'SQL'
SET ROLE ada;
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, note text);
INSERT INTO customers VALUES
  (1, 'Ada Lovelace', 'ada@example.com', 'paid with card 4111 1111 1111 1111'),
  (2, 'Alan Turing', 'alan@example.com', 'call back on +44 20 7946 0958');
SQL
mariadb --no-defaults --socket="$MYSOCK" -u root <<SQL
DROP DATABASE IF EXISTS lab;
DROP USER IF EXISTS 'ada'@'%';
CREATE DATABASE lab;
CREATE USER 'ada'@'%' IDENTIFIED BY '$PASSWORD';
GRANT ALL ON lab.* TO 'ada'@'%';
USE lab;
CREATE TABLE customers (id int PRIMARY KEY, name varchar(40), email varchar(80), note varchar(80));
INSERT INTO customers VALUES
  (1, 'Ada Lovelace', 'ada@example.com', 'paid with card 4111 1111 1111 1111'),
  (2, 'Alan Turing', 'alan@example.com', 'call back on +44 20 7946 0958');
SQL
echo "db: PostgreSQL on :5432 and MariaDB on :3306, database lab, login ada (from $NET)"
