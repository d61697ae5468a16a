#!/usr/bin/env bash
# The demo: a sample LIS in a throwaway PostgreSQL 15 cluster with the hmr extension, the
# platform simulator and the worker. It audits sample lab reports and prints what the
# (simulated) city platform received, then stops everything it started.
#   scripts/demo.sh          run and clean up
#   scripts/demo.sh --keep   leave it running and print how to connect
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

keep=false
[ "${1:-}" = "--keep" ] && keep=true
demo=/tmp/hmr-demo
port=5499
sim_pid=""; worker_pid=""

cleanup() {
  if [ -n "$worker_pid" ] && kill -TERM "$worker_pid" 2>/dev/null; then
    wait "$worker_pid" 2>/dev/null || true
  fi
  if [ -n "$sim_pid" ]; then kill "$sim_pid" 2>/dev/null || true; fi
  stop_cluster "$demo/pg"
}

started=$(date +%s)
bash scripts/bootstrap.sh
echo "== building (first time: several minutes)"
build_all

echo "== starting PostgreSQL 15 (throwaway cluster in $demo/pg, unix socket only)"
stop_cluster "$demo/pg"
rm -rf "$demo"; mkdir -p "$demo"
start_cluster "$demo/pg" "$port"
$keep || trap cleanup EXIT
psql_his() { psql -X -q -v ON_ERROR_STOP=1 -h "$demo/pg" -p "$port" -U postgres -d his "$@"; }
psql -X -q -h "$demo/pg" -p "$port" -U postgres -d postgres -c "CREATE DATABASE his"
psql_his -c "CREATE EXTENSION hmr"
echo "SELECT hmr.load_catalog(:'catalog') AS catalog_items_loaded" | psql_his -v catalog="$(cat sql/catalog-sample.csv)"
for f in sql/demo/01_his_schema.sql sql/demo/02_hmr_sources.sql sql/demo/03_sample_data.sql; do
  psql_his -f "$f" >/dev/null
done

echo "== checking the source views (no rows = ready)"
psql_his -c "SELECT * FROM hmr.check_sources() WHERE kind <> 'exam_report'"

echo "== starting the platform simulator"
org1="124413004567890125,惠州市第一人民医院,hz1,hz1-secret,hz1-app,hz1-app-secret"
org2="124413004567890200,惠州市中心人民医院,hz2,hz2-secret,hz2-app,hz2-app-secret"
./target/debug/hmr-platform-sim --listen 127.0.0.1:0 --catalog sql/catalog-sample.csv \
  --org "$org1" --org "$org2" >"$demo/sim.out" 2>"$demo/sim.log" &
sim_pid=$!
for _ in $(seq 50); do grep -q listening "$demo/sim.out" 2>/dev/null && break; sleep 0.1; done
sim_url=$(head -1 "$demo/sim.out" | awk '{print $NF}')
echo "   $sim_url"

echo "== starting the worker"
cat >"$demo/worker.toml" <<TOML
[database]
url = "host=$demo/pg port=$port user=postgres dbname=his"

[platform]
base_url = "$sim_url"
org_code = "124413004567890125"
username = "hz1"
password = "hz1-secret"
campus_codes = ["HZ01", "HZ02"]

[worker]
poll_interval_ms = 500
poll_sources_ms = 1000

[pdf]
hospital_name = "惠州市第一人民医院"
TOML
chmod 600 "$demo/worker.toml"
./target/debug/hmr-worker --config "$demo/worker.toml" run 2>"$demo/worker.log" &
worker_pid=$!

echo "== patients, departments (two campuses) and staff were captured as the sample HIS was loaded"
echo "== the RIS has one final CT report (polled; its item is mapped to the catalog) and one preliminary"
echo "== the LIS audits three reports (three transactions)"
for r in L20261126001 L20261126002 L20261126003; do
  psql_his -c "UPDATE lis.report SET status = 'audited', audited_at = now() WHERE report_no = '$r'"
done

for _ in $(seq 100); do
  left=$(psql_his -At -c "SELECT pending + in_flight FROM hmr.status")
  [ "$left" = 0 ] && break; sleep 0.1
done

echo "== delivery log (hmr.outbox_history)"
psql_his -c "SELECT id, kind, key, outcome, version, finished_at - created_at AS took FROM hmr.outbox_history ORDER BY id"
echo "== the first lab report's PDF, as the platform holds it (rendered from the template)"
curl -s "$sim_url/_sim/pdf/124413004567890125/lab/L20261126001/1" -o "$demo/L20261126001.pdf"
echo "   $(stat -c %s "$demo/L20261126001.pdf") bytes: $demo/L20261126001.pdf"
pdftotext -layout "$demo/L20261126001.pdf" - | sed -n '1,16p' | sed 's/^/   | /'
echo "== what the simulated city platform received"
curl -s "$sim_url/_sim/summary"
echo
echo "demo finished in $(( $(date +%s) - started )) s"

if $keep; then
  cat <<EOF2

Everything is still running:
  database:   psql -h $demo/pg -p $port -U postgres -d his
  simulator:  $sim_url   (GET /_sim/summary, /_sim/requests, /_sim/state)
  worker log: $demo/worker.log     config: $demo/worker.toml
Try:  UPDATE lis.report SET status = 'draft' WHERE report_no = 'L20261126001';   -- 取消审核 → revoke
Stop: kill $worker_pid $sim_pid; runuser -u postgres -- $PG_BIN/pg_ctl -D $demo/pg/data stop
EOF2
fi
