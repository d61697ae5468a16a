#!/usr/bin/env bash
# Trigger overhead in the HIS transaction: pgbench, 2 clients, single-row INSERT (patient
# registration) and UPDATE (report approval), with no trigger, hmr's capture trigger, a plain
# PL/pgSQL outbox trigger, PgQ's logutriga and (when installed) pgmq.send from a trigger.
# Median of ROUNDS interleaved rounds; latency relative to no trigger in the same round.
#   bench/trigger_overhead.sh [SECONDS_PER_RUN] [ROUNDS] [synchronous_commit]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
secs=${1:-10}; rounds=${2:-3}; sync=${3:-off}
dpkg-query -W -f='${Status}' postgresql-15-pgq3 2>/dev/null | grep -q 'install ok' \
  || { apt-get install -y -qq postgresql-15-pgq3 >/dev/null 2>&1 || echo "(PgQ not installable: skipped)"; }
dir=/tmp/hmr-bench-trigger; port=5498
stop_cluster "$dir"; start_cluster "$dir" "$port"
trap 'stop_cluster "$dir"' EXIT
psql_b() { psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres "$@"; }
psql_b -c "ALTER SYSTEM SET synchronous_commit = '$sync'" -c "SELECT pg_reload_conf()" >/dev/null
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
if psql_b -c "CREATE EXTENSION pgmq" >/dev/null 2>&1 || psql_b -c "SELECT pgmq.create('q')" >/dev/null 2>&1; then
  psql_b >/dev/null <<'SQL'
SELECT pgmq.create('q');
CREATE TABLE t_pgmq (id bigserial PRIMARY KEY, report_no text, status text);
CREATE FUNCTION pgmq_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pgmq.send('q', jsonb_build_object('kind', 'lab_report', 'key', NEW.report_no, 'op', TG_OP)); RETURN NULL; END $$;
CREATE TRIGGER c AFTER INSERT OR UPDATE ON t_pgmq FOR EACH ROW EXECUTE FUNCTION pgmq_capture();
SQL
  variants="$variants pgmq"
fi
for v in $variants; do
  psql_b -c "INSERT INTO t_$v (report_no, status) SELECT 'R' || g, 'a' FROM generate_series(1, 10000) g" >/dev/null
done
psql_b -c "VACUUM ANALYZE" >/dev/null
work=$(mktemp -d)
for v in $variants; do
  printf '\\set r random(1, 1000000000)\nINSERT INTO t_%s (report_no, status) VALUES (:r, :r);\n' "$v" > "$work/insert_$v.sql"
  printf '\\set i random(1, 10000)\nUPDATE t_%s SET status = status || :i WHERE id = :i;\n' "$v" > "$work/update_$v.sql"
done
declare -A lat
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
      echo "round $round $op $v: latency $l ms, $n tx, $wal WAL bytes/tx" >&2
      psql_b -c "VACUUM t_$v" >/dev/null
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| variant | INSERT latency (ms) | ×none | UPDATE latency (ms) | ×none |"
echo "|---|---|---|---|---|"
for v in $variants; do
  i=$(echo "${lat[insert,$v]}" | median); u=$(echo "${lat[update,$v]}" | median)
  i0=$(echo "${lat[insert,none]}" | median); u0=$(echo "${lat[update,none]}" | median)
  printf '| %s | %s | %.2f | %s | %.2f |\n' "$v" "$i" "$(echo "$i / $i0" | bc -l)" "$u" "$(echo "$u / $u0" | bc -l)"
done
echo "(synchronous_commit=$sync, pgbench -c 2 -j 2 -T $secs, median of $rounds interleaved rounds)"
