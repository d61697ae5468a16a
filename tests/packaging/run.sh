#!/usr/bin/env bash
# `cond && pass … || fail …` is safe here: pass always succeeds.
# shellcheck disable=SC2015
# The packages as a hospital installs them (issue #30), in a Debian 12 chroot made by
# debootstrap from Debian's own packages: no cargo, rustc or clang there, and the build tree
# out of reach (only the two .deb files and nothing else are copied in).
#   1. `apt install ./postgresql-15-hmr_*.deb ./hmr-worker_*.deb` as the README says; the demo's
#      SQL (from /usr/share/hmr/sql) and the worker and the simulator (from /usr/bin) run, and a
#      patient reaches the simulated platform.
#   2. The next version of the extension package installed with `dpkg -i` while sessions have
#      hmr loaded and busy (capture firing, recognition calls, the gate): no backend crashes,
#      the postmaster is not restarted, the open sessions keep working (their old library
#      stays mapped, deleted), new sessions map the new file, ALTER EXTENSION hmr UPDATE moves
#      the database. With HMR_PACKAGING_IN_PLACE=1 the new library is instead copied over the
#      old one in place (what `cargo pgrx install` does): this step must then fail.
#   3. The worker package upgraded while the worker runs: the hospital's configuration is kept,
#      reports approved during the upgrade all reach the platform.
#   4. Purging the worker package removes /etc/hmr and leaves the database's hmr schema.
# Usage: tests/packaging/run.sh [DEB_DIR]   (DEB_DIR: packages from scripts/package.sh)
# Each step prints PASS or FAIL; the last line is the summary. Root only (chroot, mounts).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
debs=${1:-target/debian}
root=${HMR_CHROOT:-/var/cache/hmr/bookworm}
mirror=${HMR_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d /tmp/hmr-packaging.XXXXXX)
passed=0; failed=0
pass() { echo "PASS $*"; passed=$((passed + 1)); }
fail() { echo "FAIL $*"; failed=$((failed + 1)); }
in_root() { chroot "$root" "$@"; }
as_pg() { chroot "$root" runuser -u postgres -- "$@"; }
psql_his() { as_pg psql -X -q -At -v ON_ERROR_STOP=1 -h /tmp/pg -p 5433 -d his "$@"; }

# Signals processes of the chroot only: the chroot shares the machine's process table, and a
# pattern alone would also match this machine's own workers and simulators (other tests').
kill_in_root() { # kill_in_root SIGNAL PATTERN
  local pid real; real=$(realpath -m "$root")
  for pid in $(pgrep -f "$2"); do
    [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$real" ] && kill "-$1" "$pid" 2>/dev/null
  done
  return 0
}

cleanup() {
  set +e
  kill_in_root TERM "/tmp/loop-"; kill_in_root TERM /usr/bin/hmr-worker; kill_in_root TERM /usr/bin/hmr-platform-sim
  as_pg /usr/lib/postgresql/15/bin/pg_ctl -D /tmp/pg/data -m immediate stop >/dev/null 2>&1
  for m in dev/shm dev/pts dev proc; do umount -l "$root/$m" 2>/dev/null; done
  rm -rf "$root/run/systemd" "$root/usr/bin/systemctl"
  [ -e "$root/usr/bin/deb-systemd-invoke.real" ] && mv "$root/usr/bin/deb-systemd-invoke.real" "$root/usr/bin/deb-systemd-invoke"
}
trap cleanup EXIT

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ext_deb=$(ls "$debs"/postgresql-15-hmr_"$version"-1_*.deb) || { echo "no packages in $debs"; exit 1; }
worker_deb=$(ls "$debs"/hmr-worker_"$version"-1_*.deb) || exit 1

# ------------------------------------------------------------------ the clean machine
if [ ! -x "$root/usr/lib/postgresql/15/bin/postgres" ]; then
  echo "== debootstrap: Debian 12 with PostgreSQL 15 only ($root)"
  rm -rf "$root"; mkdir -p "$(dirname "$root")"
  debootstrap --variant=minbase --include=postgresql-15,postgresql-client-15,ca-certificates,procps \
    bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail "$work/debootstrap.log"; exit 1; }
fi
mount -t proc proc "$root/proc"; mount --bind /dev "$root/dev"; mount --bind /dev/pts "$root/dev/pts"
mount -t tmpfs tmpfs "$root/dev/shm"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
# No service starts in the chroot (no systemd there): the packages must not need one.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
rm -rf "$root/tmp/debs" "$root/tmp/pg"; mkdir -p "$root/tmp/debs"
# A reused chroot starts as a machine without hmr.
in_root dpkg --purge postgresql-15-hmr hmr-worker >/dev/null 2>&1 || true

if in_root sh -c 'command -v cargo || command -v rustc || command -v clang || ls /work' >/dev/null 2>&1; then
  fail "the chroot has a compiler or the build tree"
else
  pass "no cargo, rustc, clang or build tree in the chroot"
fi

# ------------------------------------------------------------------ 1. install and run
cp "$ext_deb" "$worker_deb" "$root/tmp/debs/"
# No systemd runs in the chroot: stand-ins record what the packages ask of it, so the test sees
# that a first install starts nothing, an upgrade restarts the services only if they were
# running (try-restart), and a removal stops them. (In /usr/bin: apt gives maintainer scripts
# a PATH of its own, without /usr/local.)
in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq init-system-helpers adduser' \
  >"$work/apt-deps.log" 2>&1 || { tail "$work/apt-deps.log"; exit 1; }
mkdir -p "$root/run/systemd/system"; : > "$root/tmp/systemd-calls"
[ -e "$root/usr/bin/deb-systemd-invoke.real" ] || mv "$root/usr/bin/deb-systemd-invoke" "$root/usr/bin/deb-systemd-invoke.real"
if [ -e "$root/usr/bin/systemctl" ] && ! grep -q systemd-calls "$root/usr/bin/systemctl"; then
  echo "the chroot has systemd: the stand-in would replace it"; exit 1
fi
for tool in deb-systemd-invoke systemctl; do
  printf '#!/bin/sh\necho "%s $*" >> /tmp/systemd-calls\n' "$tool" > "$root/usr/bin/$tool"
  chmod +x "$root/usr/bin/$tool"
done
if in_root sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq /tmp/debs/postgresql-15-hmr_*.deb /tmp/debs/hmr-worker_*.deb' \
    >"$work/apt.log" 2>&1; then
  pass "apt install ./postgresql-15-hmr_*.deb ./hmr-worker_*.deb"
else
  tail -20 "$work/apt.log"; fail "apt install"; exit 1
fi
if grep -Eq ' (start|enable|restart|reload-or-restart) ' "$root/tmp/systemd-calls"; then
  fail "the first install started a service: $(cat "$root/tmp/systemd-calls")"
else
  grep -q "try-restart hmr-worker.service" "$root/tmp/systemd-calls" \
    && pass "the first install starts no service (only: $(tr '\n' ';' < "$root/tmp/systemd-calls"))" \
    || fail "the first install did not reach systemd's stand-in: $(cat "$root/tmp/systemd-calls")"
fi
: > "$root/tmp/systemd-calls"
mode=$(in_root stat -c '%a %U' /etc/hmr/worker.toml)
[ "$mode" = "600 hmr" ] && pass "/etc/hmr/worker.toml is 0600, owned by hmr" || fail "/etc/hmr/worker.toml is $mode"

mkdir -p "$root/tmp/pg"; in_root chown postgres /tmp/pg
as_pg /usr/lib/postgresql/15/bin/initdb -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync -D /tmp/pg/data >/dev/null
as_pg /usr/lib/postgresql/15/bin/pg_ctl -w -D /tmp/pg/data -l /tmp/pg/postgres.log \
  -o "-p 5433 -k /tmp/pg -c listen_addresses='' -c fsync=off" start >/dev/null
as_pg psql -X -q -h /tmp/pg -p 5433 -d postgres -c "CREATE DATABASE his"
psql_his -c "CREATE EXTENSION hmr" >/dev/null
in_root cat /usr/share/hmr/catalog-sample.csv > "$work/catalog.csv"
echo "SELECT hmr.load_catalog(:'catalog')" | psql_his -v catalog="$(cat "$work/catalog.csv")" >/dev/null
for f in 01_his_schema 02_hmr_sources 03_sample_data; do
  psql_his -f "/usr/share/hmr/sql/demo/$f.sql" >/dev/null || fail "demo SQL $f"
done
for f in 01_orders 02_workstation; do
  psql_his -f "/usr/share/hmr/sql/examples/$f.sql" >/dev/null || fail "example SQL $f"
done

org1="124413004567890125,惠州市第一人民医院,hz1,hz1-secret,hz1-app,hz1-app-secret"
org2="124413004567890200,惠州市中心人民医院,hz2,hz2-secret,hz2-app,hz2-app-secret"
in_root sh -c "/usr/bin/hmr-platform-sim --listen 127.0.0.1:18721 --catalog /usr/share/hmr/catalog-sample.csv \
  --org '$org1' --org '$org2' >/tmp/sim.out 2>/tmp/sim.log" &
for _ in $(seq 50); do grep -q listening "$root/tmp/sim.out" 2>/dev/null && break; sleep 0.1; done
sim=http://127.0.0.1:18721
psql_his -c "SELECT hmr.configure_platform('$sim', '124413004567890125', 'hz1', 'hz1-secret')" >/dev/null
# The hospital's configuration, written over the example (a conffile: upgrades keep it).
cat > "$root/etc/hmr/worker.toml" <<TOML
[database]
url = "host=/tmp/pg port=5433 user=postgres dbname=his"

[platform]
base_url = "$sim"
org_code = "124413004567890125"
auth = "password"
username = "hz1"
password = "hz1-secret"
campus_codes = ["HZ01", "HZ02"]

[worker]
poll_interval_ms = 200
poll_sources_ms = 1000

[pdf]
render = false
TOML
in_root chown hmr:hmr /etc/hmr/worker.toml; in_root chmod 0600 /etc/hmr/worker.toml
conf_sum=$(md5sum < "$root/etc/hmr/worker.toml")
in_root runuser -u hmr -- /usr/bin/hmr-worker --config /etc/hmr/worker.toml run >/dev/null 2>"$work/worker.log" &
delivered() { psql_his -c "SELECT count(*) FROM hmr.delivered WHERE kind = '$1'"; }
for _ in $(seq 100); do [ "$(delivered patient)" -ge 3 ] && break; sleep 0.2; done
[ "$(delivered patient)" -ge 3 ] && pass "the demo's patients reach the platform (worker and simulator from /usr/bin)" \
  || { tail "$work/worker.log"; fail "patients not delivered"; }

# ------------------------------------------------------------------ 2. the next extension version, live
echo "== building the next extension package (0.3.1: another build of the library, an upgrade script)"
next=$work/next; rm -rf "$next"; dpkg-deb -R "$ext_deb" "$next"
lib=usr/lib/postgresql/15/lib/hmr.so; share=usr/share/postgresql/15/extension
# Another build of the same code: the development build installed on this machine.
cp "/$lib" "$next/$lib"
sed -i "s/^default_version = .*/default_version = '0.3.1'/" "$next/$share/hmr.control"
cp "$next/$share/hmr--$version.sql" "$next/$share/hmr--0.3.1.sql"
printf -- "-- the next version, for the live-upgrade test\nCREATE FUNCTION hmr.next_marker() RETURNS text LANGUAGE sql AS \$\$ SELECT '0.3.1' \$\$;\n" \
  > "$next/$share/hmr--$version--0.3.1.sql"
sed -i "s/^Version: .*/Version: 0.3.1-1/" "$next/DEBIAN/control"
dpkg-deb --root-owner-group --build "$next" "$root/tmp/debs/postgresql-15-hmr_0.3.1-1.deb" >/dev/null
cmp -s "$next/$lib" "$root/$lib" && fail "the next library is the same file"

started_at=$(psql_his -c "SELECT pg_postmaster_start_time()")
loop() { # loop NAME SQL: a session that runs SQL every 0.1 s until killed
  printf '%s\n\\watch 0.1\n' "$2" > "$root/tmp/loop-$1.sql"
  as_pg psql -X -q -At -h /tmp/pg -p 5433 -d his -v ON_ERROR_STOP=1 -f "/tmp/loop-$1.sql" \
    >"$work/$1.out" 2>"$work/$1.err" &
}
loop capture "UPDATE his.patient SET phone = phone WHERE patient_id = 'P0001'"
loop recognition "SELECT (hmr_list_recognitions('01', '441302198003151233', 'MZ001', 'D001', '0301', use_cache => false))->>'status'"
loop gate "INSERT INTO his.orders (order_id, patient_id, visit_type, visit_no, doctor_no, dept_code, item_type, item_code) VALUES ('G' || clock_timestamp()::text, 'P0001', '1', 'MZ001', 'D001', '0301', 'lab', 'JY0005')"
sleep 3
old_backends=$(psql_his -c "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE datname = 'his' AND pid <> pg_backend_pid() AND application_name = 'psql'")
if [ "${HMR_PACKAGING_IN_PLACE:-0}" = 1 ]; then
  echo "== writing the new library in place (the negative control)"
  cp "$next/$lib" "$root/$lib"
else
  in_root dpkg -i /tmp/debs/postgresql-15-hmr_0.3.1-1.deb >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i the next version"; }
fi
sleep 4
alive=0
for n in capture recognition gate; do
  for pid in $(pgrep -f "psql .*/tmp/loop-$n.sql"); do
    [ "$(readlink "/proc/$pid/root")" = "$(realpath -m "$root")" ] && { alive=$((alive + 1)); break; }
  done
done
# A new session started after the install: which library file does it map?
as_pg psql -X -q -At -h /tmp/pg -p 5433 -d his -c "SELECT hmr.decision_problem(true, NULL, NULL)" -c "SELECT pg_sleep(5)" >/dev/null 2>&1 &
sleep 1
new_pid=$(psql_his -c "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(5)%' AND pid <> pg_backend_pid() LIMIT 1")
# What the busy sessions said, and which library file their backends map, before they stop.
cat "$work"/capture.err "$work"/recognition.err "$work"/gate.err > "$work/errors"
mapped_old=0
for pid in $old_backends; do grep -q 'hmr.so (deleted)' "/proc/$pid/maps" 2>/dev/null && mapped_old=$((mapped_old + 1)); done
kill_in_root TERM "/tmp/loop-"; sleep 0.5
[ "$alive" = 3 ] && pass "the three busy sessions kept running through the upgrade" || fail "$((3 - alive)) busy sessions ended"
if grep -q . "$work/errors"; then
  fail "the busy sessions reported: $(sort "$work/errors" | uniq -c | head -5)"
else
  pass "no error in the busy sessions"
fi
grep -c '^ok$' "$work/recognition.out" >/dev/null && pass "recognition calls answered ok before and after" \
  || fail "recognition answers: $(sort "$work/recognition.out" | uniq -c)"
if grep -Eq "terminated by signal|server process .* was terminated|all server processes terminated" "$root/tmp/pg/postgres.log"; then
  fail "a backend crashed: $(grep -E 'terminated' "$root/tmp/pg/postgres.log" | head -3)"
else
  pass "no backend crashed (server log)"
fi
[ "$(psql_his -c "SELECT pg_postmaster_start_time()")" = "$started_at" ] && pass "the postmaster was not restarted" \
  || fail "the postmaster restarted"
[ "$mapped_old" -ge 1 ] && pass "open sessions keep the library they loaded ($mapped_old backends map the old, deleted file)" \
  || fail "no open session maps the old library"
# A new session loads the new file (its inode is the installed one).
new_inode=$(stat -c %i "$root/$lib")
grep hmr.so "/proc/$new_pid/maps" 2>/dev/null | grep -v deleted | grep -q " $new_inode " \
  && pass "a session opened after the install maps the new library" || fail "the new session's library: $(grep hmr.so "/proc/$new_pid/maps" | head -1)"
psql_his -c "ALTER EXTENSION hmr UPDATE" >/dev/null
[ "$(psql_his -c "SELECT extversion FROM pg_extension WHERE extname = 'hmr'")" = 0.3.1 ] \
  && [ "$(psql_his -c "SELECT hmr.next_marker()")" = 0.3.1 ] \
  && pass "ALTER EXTENSION hmr UPDATE moves the database to 0.3.1" || fail "ALTER EXTENSION hmr UPDATE"
[ "$(psql_his -c "SELECT (hmr_list_recognitions('01', '441302198003151233', 'MZ001', 'D001', '0301', use_cache => false))->>'status'")" = ok ] \
  && pass "a new session's recognition call answers ok" || fail "a new session's call"

# ------------------------------------------------------------------ 3. the worker, upgraded while it runs
wnext=$work/wnext; rm -rf "$wnext"; dpkg-deb -R "$worker_deb" "$wnext"
sed -i "s/^Version: .*/Version: $version-2/" "$wnext/DEBIAN/control"
dpkg-deb --root-owner-group --build "$wnext" "$root/tmp/debs/hmr-worker_$version-2.deb" >/dev/null
psql_his -c "UPDATE lis.report SET status = 'audited', audited_at = now() - interval '1 minute' WHERE report_no = 'L20261126001'" >/dev/null
in_root sh -c 'DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/debs/hmr-worker_*-2.deb' >"$work/dpkg-worker.log" 2>&1 \
  || { cat "$work/dpkg-worker.log"; fail "dpkg -i the next worker"; }
psql_his -c "UPDATE lis.report SET status = 'audited', audited_at = now() - interval '1 minute' WHERE report_no = 'L20261126002'" >/dev/null
grep -q "deb-systemd-invoke try-restart hmr-worker.service hmr-serve.service" "$root/tmp/systemd-calls" \
  && ! grep -Eq ' (start|restart) ' "$root/tmp/systemd-calls" \
  && pass "the upgrade restarts the services only if they run (try-restart)" \
  || fail "the upgrade asked systemd: $(cat "$root/tmp/systemd-calls")"
: > "$root/tmp/systemd-calls"
[ "$(md5sum < "$root/etc/hmr/worker.toml")" = "$conf_sum" ] && pass "the hospital's /etc/hmr/worker.toml kept" \
  || fail "the configuration changed"
# The running worker keeps its (renamed-over) binary; restarted, it is the new one.
kill_in_root TERM /usr/bin/hmr-worker; sleep 1
in_root runuser -u hmr -- /usr/bin/hmr-worker --config /etc/hmr/worker.toml run >/dev/null 2>>"$work/worker.log" &
for _ in $(seq 100); do [ "$(delivered lab_report)" -ge 2 ] && break; sleep 0.2; done
[ "$(delivered lab_report)" -ge 2 ] && pass "both reports approved around the upgrade reached the platform" \
  || fail "reports delivered: $(delivered lab_report)"

# ------------------------------------------------------------------ 4. purge
kill_in_root TERM /usr/bin/hmr-worker; sleep 1
in_root dpkg --purge hmr-worker >"$work/purge.log" 2>&1 || { cat "$work/purge.log"; fail "purge"; }
if [ ! -e "$root/etc/hmr" ] && [ "$(psql_his -c "SELECT count(*) > 0 FROM hmr.delivered")" = t ]; then
  pass "purging hmr-worker removes /etc/hmr and leaves the database's hmr schema"
else
  fail "purge"
fi
grep -q "deb-systemd-invoke stop hmr-worker.service hmr-serve.service" "$root/tmp/systemd-calls" \
  && pass "removing the package stops the services" || fail "the removal asked systemd: $(cat "$root/tmp/systemd-calls")"

echo "packaging: $passed passed, $failed failed"
rm -rf "$work"
[ "$failed" = 0 ]
