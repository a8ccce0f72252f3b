#!/bin/sh
# Provisions the bastion: the sluice agent protecting the databases on `db` (named, not
# numbered: the target's `match` is `db:5432`, re-resolved when the name moves), the example
# policies and masking rules, the engineer `ada` identified by uid, and enrollment with a
# collector when one is given.
#
# Two ways to run, one script:
# - on a machine booted with systemd (Vagrant): installs the packages `cargo xtask package`
#   built (target/debian/*.deb under SLUICE_SRC), creates the account `ada`, names `db` in
#   /etc/hosts, writes /etc/sluice/sluice.toml and starts the unit;
# - without systemd as PID 1 (`cargo xtask lab`, inside the lab's `bastion` network
#   namespace): SLUICE_ROOT names a directory standing for the bastion's /, into which the
#   package (SLUICE_DEB, or the one under target/debian) is installed with `dpkg --root`,
#   ENGINEER_UID the engineer's uid (no account is created on the host), SLUICE_CGROUP the
#   cgroup the agent attaches to; /etc/hosts is then the namespace's own (the lab mounts
#   /etc/netns/<ns>/hosts there). The caller starts the agent as the installed unit would
#   (its ExecStart, UMask, NoNewPrivileges and CapabilityBoundingSet).
#
# Optional: COLLECTOR (host:port) and COLLECTOR_TOKEN (from `sluice-collector token`) enroll
# the agent so it ships its journal.
set -eu

SRC=${SLUICE_SRC:-/sluice}
DB_ADDR=${DB_ADDR:?DB_ADDR must name the address of the database host}
ROOT=${SLUICE_ROOT:-}
export DEBIAN_FRONTEND=noninteractive

if [ -n "$ROOT" ] && [ -z "$(ip netns identify 2>/dev/null)" ]; then
  echo "bastion: SLUICE_ROOT is for the lab, inside its network namespace" >&2
  exit 1
fi
if [ -z "$ROOT" ] && [ ! -d /run/systemd/system ]; then
  echo "bastion: no systemd here and no SLUICE_ROOT: refusing to install on this host" >&2
  exit 1
fi

# 1. The agent: the package `cargo xtask package` built.
deb=${SLUICE_DEB:-$(ls "$SRC"/target/debian/sluice_*.deb 2>/dev/null | tail -1 || true)}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
  echo "bastion: no sluice package (SLUICE_DEB, or $SRC/target/debian/sluice_*.deb): run \`cargo xtask package\` first" >&2
  exit 1
fi
if [ -z "$ROOT" ]; then
  echo "bastion: installing $deb"
  apt-get install -y -qq "$deb"
else
  # The lab: dpkg installs into SLUICE_ROOT with a database of its own; the maintainer
  # scripts run here with DPKG_ROOT set, and the base system is this host's.
  echo "bastion: installing $deb into $ROOT (dpkg --root)"
  install -d "$ROOT/var/lib/dpkg/info" "$ROOT/var/lib/dpkg/updates" "$ROOT/var/lib/dpkg/triggers" "$ROOT/var/log" "$ROOT/etc"
  for f in status available; do [ -f "$ROOT/var/lib/dpkg/$f" ] || : > "$ROOT/var/lib/dpkg/$f"; done
  dpkg --root="$ROOT" --log="$ROOT/var/log/dpkg.log" --force-script-chrootless --force-depends -i "$deb"
fi
BIN=$ROOT/usr/bin/sluice
# The engineers' clients.
for c in psql:postgresql-client mariadb:mariadb-client; do
  command -v "${c%%:*}" >/dev/null || {
    apt-get update -qq
    apt-get install -y -qq "${c#*:}"
  }
done

# 2. The engineer.
if [ -z "${ENGINEER_UID:-}" ]; then
  id -u ada >/dev/null 2>&1 || useradd -m -s /bin/bash ada
  ENGINEER_UID=$(id -u ada)
fi

# 3. `db` by name.
grep -qE "^[0-9.]+[[:space:]]+db$" /etc/hosts || echo "$DB_ADDR db" >> /etc/hosts

# 4. The configuration: the example policies and masking rules from the repository.
ETC=$ROOT/etc/sluice
STATE=$ROOT/var/lib/sluice
RUN=$ROOT/run/sluice
install -d -m 755 "$ETC" "$ETC/policies"
install -d -m 700 "$STATE" "$RUN"
chmod 711 "$RUN" # engineers reach the control socket (sluice login, request access)
install -m 644 "$SRC"/policies/*.cedar "$SRC"/policies/sluice.cedarschema "$ETC/policies/"
install -m 644 "$SRC/policies/masking.toml" "$ETC/masking.toml"
cgroup=""
[ -n "${SLUICE_CGROUP:-}" ] && cgroup="cgroup = \"$SLUICE_CGROUP\""
pins=/sys/fs/bpf/sluice
[ -n "$ROOT" ] && pins=/sys/fs/bpf/sluice-lab-$(ip netns identify)
cat > "$ETC/sluice.toml" <<TOML
# Written by vagrant/provision/bastion.sh.
[agent]
journal_dir = "$STATE/journal"
signing_key = "$STATE/signing.key"
encryption_key = "$STATE/journal.key"
control_socket = "$RUN/agent.sock"
bpf_pin_dir = "$pins"
policy_dir = "$ETC/policies"
masking_file = "$ETC/masking.toml"
$cgroup

[[identity]]
uid = $ENGINEER_UID
principal = "ada"
groups = ["engineers"]

# The databases on db, by name: every address \`db\` resolves to is protected.
[[target]]
name = "lab-postgres"
protocol = "postgres"
match = "db:5432"

[[target]]
name = "lab-mariadb"
protocol = "mysql"
match = "db:3306"

[shipper]
interval_ms = 200
TOML
chmod 644 "$ETC/sluice.toml"
"$BIN" check-config --config "$ETC/sluice.toml"

# 5. The collector, when given.
if [ -n "${COLLECTOR:-}" ] && [ -n "${COLLECTOR_TOKEN:-}" ]; then
  "$BIN" enroll --collector "$COLLECTOR" --token "$COLLECTOR_TOKEN" --config "$ETC/sluice.toml"
fi

# 6. Start it: the unit under systemd; in the lab the caller starts it as the unit would.
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  systemctl enable --now sluice.service
fi
echo "bastion: sluice configured ($ETC/sluice.toml), engineer ada is uid $ENGINEER_UID"
