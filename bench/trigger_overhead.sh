#!/usr/bin/env bash
# Trigger overhead in the HIS transaction: pgbench, 2 clients, single-row INSERT (patient
# registration) and UPDATE (report approval), with no trigger, hmr's capture trigger, a plain
# PL/pgSQL outbox trigger, PgQ's logutriga and pgmq.send from a PL/pgSQL trigger. Every variant
# records the same event (kind, key, op) per row change, so one pgbench transaction is one event.
# Median of ROUNDS interleaved rounds; latency relative to no trigger in the same round, and WAL
# bytes per transaction (= per event) from pg_current_wal_lsn() around each run.
#   bench/trigger_overhead.sh [SECONDS_PER_RUN] [ROUNDS] [synchronous_commit: on|off]
# PgQ comes from Debian (postgresql-15-pgq3, installed when missing). pgmq is installed as plain
# SQL, no compiled extension: its install script ships in the pgmq crate on crates.io
# (src/install/embedded/sql/pgmq.sql, the script that `pgmq-cli install install-from-embedded`
# runs for a fresh install); `cargo info` fetches that crate into ~/.cargo/registry and psql runs
# the script. PGMQ_CRATE_VERSION picks the crate (default 0.33.7, pgmq 1.11.1); PGMQ_SQL=FILE
# uses a local pgmq.sql instead. A variant that cannot be installed is skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
secs=${1:-10}; rounds=${2:-3}; sync=${3:-off}
case $sync in on|off|local|remote_write|remote_apply) ;;
  *) echo "synchronous_commit must be on or off (or local, remote_write, remote_apply), not '$sync'" >&2; exit 2;; esac
dpkg-query -W -f='${Status}' postgresql-15-pgq3 2>/dev/null | grep -q 'install ok' \
  || { apt-get install -y -qq postgresql-15-pgq3 >/dev/null 2>&1 || echo "(PgQ not installable: skipped)"; }
# pgmq_sql_file: path of pgmq's plain-SQL install script, fetched from crates.io with cargo.
pgmq_sql_file() {
  local v=${PGMQ_CRATE_VERSION:-0.33.7} f try
  if [ -n "${PGMQ_SQL:-}" ]; then [ -f "$PGMQ_SQL" ] && echo "$PGMQ_SQL"; return; fi
  for try in 1 2; do
    for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"pgmq-$v"/src/install/embedded/sql/pgmq.sql; do
      [ -f "$f" ] && { echo "$f"; return 0; }
    done
    # Outside the workspace so that its Cargo.lock plays no part; downloads only this crate.
    [ "$try" = 1 ] && (cd "$work" && cargo info --quiet "pgmq@$v" >/dev/null 2>&1)
  done
  return 1
}
dir=/tmp/hmr-bench-trigger; port=5498; work=$(mktemp -d)
trap 'stop_cluster "$dir"; rm -rf "$work"' EXIT
pgmq_sql=$(pgmq_sql_file) || { pgmq_sql=; echo "(pgmq SQL not fetchable from crates.io: skipped)"; }
stop_cluster "$dir"; start_cluster "$dir" "$port"
psql_b() { psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres "$@"; }
# Test clusters run with fsync=off; a synchronous commit is only measured with real flushes.
fsync=off; [ "$sync" = off ] || fsync=on
psql_b -c "ALTER SYSTEM SET synchronous_commit = '$sync'" -c "ALTER SYSTEM SET fsync = $fsync" \
  -c "SELECT pg_reload_conf()" >/dev/null
psql_b <<'SQL' >/dev/null
CREATE EXTENSION hmr;
CREATE TABLE t_none  (id bigserial PRIMARY KEY, report_no text, status text);
CREATE TABLE t_hmr   (id bigserial PRIMARY KEY, report_no text, status text);
CREATE TABLE t_plain (id bigserial PRIMARY KEY, report_no text, status text);
CREATE TABLE plain_outbox (id bigserial PRIMARY KEY, kind text, key text, op "char");
CREATE FUNCTION plain_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO plain_outbox (kind, key, op) VALUES ('lab_report', NEW.report_no, left(TG_OP, 1)); RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT OR UPDATE ON t_plain FOR EACH ROW EXECUTE FUNCTION plain_capture();
SELECT hmr.watch('lab_report', 't_hmr', 'report_no');
SQL
variants="none hmr plain"
if psql_b -c "CREATE EXTENSION pgq" >/dev/null 2>&1; then
  psql_b >/dev/null <<'SQL'
SELECT pgq.create_queue('q');
CREATE TABLE t_pgq (id bigserial PRIMARY KEY, report_no text, status text);
CREATE TRIGGER c AFTER INSERT OR UPDATE ON t_pgq FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('q');
SQL
  variants="$variants pgq"
fi
if [ -n "$pgmq_sql" ] && psql_b -f "$pgmq_sql" >/dev/null 2>"$work/pgmq.err"; then
  psql_b >/dev/null <<'SQL'
SELECT pgmq.create('q');
CREATE TABLE t_pgmq (id bigserial PRIMARY KEY, report_no text, status text);
CREATE FUNCTION pgmq_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pgmq.send('q', jsonb_build_object('kind', 'lab_report', 'key', NEW.report_no, 'op', left(TG_OP, 1)));
  RETURN NULL;
END $$;
CREATE TRIGGER c AFTER INSERT OR UPDATE ON t_pgmq FOR EACH ROW EXECUTE FUNCTION pgmq_capture();
SQL
  variants="$variants pgmq"
elif [ -n "$pgmq_sql" ]; then
  echo "(pgmq SQL install failed: skipped) $(head -c 300 "$work/pgmq.err")"
fi
for v in $variants; do
  psql_b -c "INSERT INTO t_$v (report_no, status) SELECT 'R' || g, 'a' FROM generate_series(1, 10000) g" >/dev/null
done
psql_b -c "VACUUM ANALYZE" >/dev/null
for v in $variants; do
  printf '\\set r random(1, 1000000000)\nINSERT INTO t_%s (report_no, status) VALUES (:r, :r);\n' "$v" > "$work/insert_$v.sql"
  printf '\\set i random(1, 10000)\nUPDATE t_%s SET status = status || :i WHERE id = :i;\n' "$v" > "$work/update_$v.sql"
done
declare -A lat wal_of
for round in $(seq "$rounds"); do
  for op in insert update; do
    for v in $variants; do
      before=$(psql_b -At -c "SELECT pg_current_wal_lsn()")
      out=$(pgbench -n -h "$dir" -p "$port" -U postgres -c 2 -j 2 -T "$secs" -f "$work/${op}_$v.sql" postgres 2>&1)
      after=$(psql_b -At -c "SELECT pg_current_wal_lsn()")
      l=$(echo "$out" | awk '/latency average/ {print $4}')
      n=$(echo "$out" | awk '/number of transactions actually processed/ {print $6}')
      wal=$(psql_b -At -c "SELECT round(pg_wal_lsn_diff('$after', '$before') / greatest($n, 1))")
      lat[$op,$v]="${lat[$op,$v]:-} $l"
      wal_of[$op,$v]="${wal_of[$op,$v]:-} $wal"
      echo "round $round $op $v: latency $l ms, $n tx, $wal WAL bytes/tx" >&2
      psql_b -c "VACUUM t_$v" >/dev/null
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| variant | INSERT latency (ms) | ×none | INSERT WAL bytes/event (+none) | UPDATE latency (ms) | ×none | UPDATE WAL bytes/event (+none) |"
echo "|---|---|---|---|---|---|---|"
for v in $variants; do
  cells=""
  for op in insert update; do
    l=$(echo "${lat[$op,$v]}" | median); l0=$(echo "${lat[$op,none]}" | median)
    w=$(echo "${wal_of[$op,$v]}" | median); w0=$(echo "${wal_of[$op,none]}" | median)
    cells="$cells$(printf ' | %s | %.2f | %s (%+d)' "$l" "$(echo "$l / $l0" | bc -l)" "$w" "$((w - w0))")"
  done
  echo "| $v$cells |"
done
# The headline figures for scripts/bench.sh's guard: hmr's INSERT latency over no trigger's and
# over the cheapest other variant's (PgQ or the plain PL/pgSQL outbox; pgmq when it ran), each
# variant by its best round: another tenant of the machine only ever adds time, so the fastest
# round is the closest to what the code costs (a run of the same variant varies by ±20% here).
if [ -n "${HMR_BENCH_FIGURES:-}" ]; then
  best() { echo "${lat[insert,$1]}" | tr ' ' '\n' | grep -v '^$' | sort -g | head -1; }
  ratio() { echo "$(best "$1") / $(best "$2")" | bc -l; }
  cheapest=
  for v in $variants; do
    case $v in none|hmr) continue;; esac
    if [ -z "$cheapest" ] || [ "$(echo "$(best "$v") < $(best "$cheapest")" | bc -l)" = 1 ]; then cheapest=$v; fi
  done
  printf 'capture_insert_ratio\t%s\n' "$(ratio hmr none)" >> "$HMR_BENCH_FIGURES"
  if [ -n "$cheapest" ]; then
    printf 'capture_vs_cheapest_other\t%s\n' "$(ratio hmr "$cheapest")" >> "$HMR_BENCH_FIGURES"
  fi
fi
echo "(synchronous_commit=$sync, fsync=$fsync, pgbench -c 2 -j 2 -T $secs, median of $rounds interleaved rounds;" \
  "one transaction = one single-row INSERT or UPDATE = one event${pgmq_sql:+; pgmq: $pgmq_sql})"
