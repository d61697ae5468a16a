#!/usr/bin/env bash
# Runs the lints and every test: protocol and worker unit tests, the extension's #[pg_test]s, the
# Debian packages in a clean chroot (tests/packaging/run.sh),
# the simulator's tests, and the end-to-end suite (throwaway PostgreSQL 15 clusters, the
# simulator and the worker as processes). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bash scripts/bootstrap.sh
echo "== lints (rustfmt, clippy on every crate, shellcheck)"
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
shellcheck -x scripts/*.sh bench/*.sh docker/*.sh tests/packaging/*.sh .ci/run
echo "== build"
build_all
cargo build --quiet -p hmr-e2e --tests

echo "== extension #[pg_test]s"
pgdata=$(mktemp -d /tmp/hmr-pgtest.XXXXXX); chown postgres "$pgdata"
(cd extension && cargo pgrx test pg15 --runas postgres --pgdata "$pgdata" 2>&1 | grep -E "^test |test result:|panicked|FAILED|error" ) \
  || { echo "extension tests failed"; exit 1; }
rm -rf "$pgdata"
# `cargo pgrx test` installed a build with its test functions: put the product back, so the
# end-to-end tests (the upgrade's comparison with a fresh install among them) see what a
# hospital installs.
(cd extension && cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null)

echo "== packages: built, installed in a Debian 12 chroot without a compiler, upgraded under live sessions"
bash scripts/package.sh --lintian
bash tests/packaging/run.sh target/debian

echo "== unit, simulator and end-to-end tests"
# --tests: no doc-tests, so the last line printed is the end-to-end suite's summary.
cargo test --no-fail-fast -p hmr-protocol -p hmr-pdf -p hmr-worker -p hmr-platform-sim -p hmr-e2e --lib --bins --tests -- --test-threads=2
