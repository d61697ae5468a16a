#!/usr/bin/env bash
# Every headline figure of BENCHMARKS.md in one command, with release builds:
#   scripts/bench.sh            the full sizes (about 15 minutes; the backlog is 1,000,000 events)
#   scripts/bench.sh --smoke    each scenario at a reduced size (a few minutes): what CI runs
#   scripts/bench.sh --no-build skip the release build (after a build in the same tree)
# Writes a results file (bench/results/<date>-<commit>[-smoke].md, or --out FILE) with the
# machine (CPU model, cores, the `SELECT 1` floor), the commit and the date, then the guard's
# table: each figure next to its goal and its CI threshold (half the goal). Exits non-zero when
# a figure falls below half its goal or a scenario did not produce its figure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

smoke=false; build=true; out=
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=true ;;
    --no-build) build=false ;;
    --out) out=$2; shift ;;
    *) echo "usage: scripts/bench.sh [--smoke] [--no-build] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit+changes"
day=$(date -u +%Y-%m-%d)
mode=full; suffix=; flag=
if $smoke; then mode=smoke; suffix=-smoke; flag=' --smoke'; fi
mkdir -p bench/results
[ -n "$out" ] || out="bench/results/$day-${commit%%+*}$suffix.md"
work=$(mktemp -d /tmp/hmr-bench.XXXXXX)
figures=$work/figures.tsv; : > "$figures"
export HMR_BENCH_FIGURES=$figures

if $build; then
  echo "== release build (worker, simulator, hmr-bench, the extension)"
  cargo build --quiet --release -p hmr-worker -p hmr-platform-sim
  cargo build --quiet --release -p hmr-e2e --bin hmr-bench
  # The benchmarks measure what a hospital installs: the release library.
  (cd extension && cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null)
fi
bench=target/release/hmr-bench

# Sizes: the full run is BENCHMARKS.md's; the smoke run keeps every scenario, smaller.
if $smoke; then
  trigger=(2 7 off); export PGMQ_SQL=/nonexistent   # pgmq is a peer for the full run only
  export HMR_BENCH_PATIENTS=20000 HMR_BENCH_REPORTS=3000
  export HMR_BENCH_SECS=20 HMR_BENCH_SECS_1000=15
  export HMR_BENCH_CALLS=200 HMR_BENCH_ROUNDS=100 HMR_BENCH_BACKLOG=60000
  export HMR_BENCH_FDW_PATIENTS=100000 HMR_BENCH_FDW_LINES=1000000
else
  trigger=(5 3 off)
  export HMR_BENCH_PATIENTS=100000 HMR_BENCH_REPORTS=20000
  export HMR_BENCH_SECS=120 HMR_BENCH_SECS_1000=60
  export HMR_BENCH_CALLS=300 HMR_BENCH_ROUNDS=300 HMR_BENCH_BACKLOG=1000000
fi

log=$work/bench.log
run() {
  echo "== $*" | tee -a "$log"
  local t0=$SECONDS
  # A scenario that fails leaves its figures missing, which the guard reports; the rest run.
  "$@" 2>&1 | tee -a "$log" || echo "FAILED: $*" | tee -a "$log"
  echo "($((SECONDS - t0)) s)" | tee -a "$log"
}
started=$SECONDS
run bash bench/trigger_overhead.sh "${trigger[@]}"
run "$bench" drain
run "$bench" latency
run "$bench" sql
run "$bench" tokens
run "$bench" hooks
run "$bench" backlog
run "$bench" fdw

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
floor=$(sed -n 's/^a trivial statement (SELECT 1): p50 \(.*\) ms$/\1/p' "$log" | head -1)
verdict=0
guard=$("$bench" guard "$figures") || verdict=$?
{
  echo "# hmr benchmark results ($mode)"
  echo
  echo "- commit: $commit"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $cpu, $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB; $(. /etc/os-release && echo "$PRETTY_NAME"), $("$PG_BIN/postgres" --version)"
  echo "- \`SELECT 1\` floor (a prepare and an execute through the bench's client): p50 ${floor:-?} ms"
  echo "- command: scripts/bench.sh$flag; sizes: patients $HMR_BENCH_PATIENTS, reports $HMR_BENCH_REPORTS," \
       "latency ${HMR_BENCH_SECS} s at 300/s and ${HMR_BENCH_SECS_1000} s at 1,000/s, backlog $HMR_BENCH_BACKLOG events," \
       "trigger rounds ${trigger[*]}; $((SECONDS - started)) s in all"
  echo
  echo "## Figures against their goals"
  echo
  echo "$guard"
  echo
  echo "## Each scenario's output"
  echo
  echo '```'
  cat "$log"
  echo '```'
} > "$out"
echo
echo "$guard"
echo "results: $out"
exit "$verdict"
