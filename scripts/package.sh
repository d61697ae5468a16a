#!/usr/bin/env bash
# Builds the Debian packages a hospital installs on its servers (no compiler there):
#   postgresql-15-hmr_<version>_amd64.deb  the extension: hmr.so, hmr.control, the install script
#                                          and every upgrade script (cargo pgrx package)
#   hmr-worker_<version>_amd64.deb         hmr-worker and hmr-platform-sim, the systemd units for
#                                          `run` and `serve`, the system user hmr, /etc/hmr/ examples
#                                          (conffiles, 0600, owned by hmr)
# Usage: scripts/package.sh [--out DIR] [--revision N] [--no-build] [--lintian]
# dpkg installs every file by writing a new one and renaming it over the old, so a backend that
# has the old hmr.so mapped keeps its pages (ARCHITECTURE.md, "Upgrades on a live database").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

out=target/debian; revision=1; build=true; run_lintian=false
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift ;;
    --revision) revision=$2; shift ;;
    --no-build) build=false ;;
    --lintian) run_lintian=true ;;
    *) echo "usage: scripts/package.sh [--out DIR] [--revision N] [--no-build] [--lintian]" >&2; exit 2 ;;
  esac
  shift
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
debversion="$version-$revision"
arch=$(dpkg --print-architecture)
maintainer="hmr maintainers <hmr@example.invalid>"
mkdir -p "$out"
stage=$(mktemp -d /tmp/hmr-package.XXXXXX)
trap 'rm -rf "$stage"' EXIT

if $build; then
  echo "== release build (the extension through cargo pgrx package; the worker and the simulator)"
  (cd extension && cargo pgrx package --pg-config "$PG_CONFIG" >/dev/null)
  cargo build --quiet --release -p hmr-worker -p hmr-platform-sim
fi

# Common to both: the copyright file and a changelog, where Debian policy wants them.
docs() { # docs PACKAGE ROOT
  local dir=$2/usr/share/doc/$1
  install -d -m 0755 "$dir"
  {
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: hmr"
    echo
    echo "Files: *"
    echo "Copyright: 2026 hmr maintainers"
    echo "License: Apache-2.0"
    echo " On Debian systems, the full text of the Apache License 2.0 is in"
    echo " /usr/share/common-licenses/Apache-2.0."
  } > "$dir/copyright"
  printf '%s (%s) stable; urgency=medium\n\n  * Release %s (see README.md of the source for what changed).\n\n -- %s  %s\n' \
    "$1" "$debversion" "$version" "$maintainer" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
    | gzip -9n > "$dir/changelog.Debian.gz"
  chmod 0644 "$dir/copyright" "$dir/changelog.Debian.gz"
}

# ------------------------------------------------------------------ postgresql-15-hmr
ext=$stage/postgresql-15-hmr
pgrx_out=target/release/hmr-pg15
[ -f "$pgrx_out/usr/lib/postgresql/15/lib/hmr.so" ] || { echo "no $pgrx_out: run without --no-build" >&2; exit 1; }
install -d -m 0755 "$ext/DEBIAN"
cp -a "$pgrx_out/usr" "$ext/"
find "$ext/usr" -type d -exec chmod 0755 {} +
find "$ext/usr" -type f -exec chmod 0644 {} +
strip --strip-unneeded "$ext/usr/lib/postgresql/15/lib/hmr.so"
docs postgresql-15-hmr "$ext"
install -d -m 0755 "$ext/usr/share/lintian/overrides"
printf '%s\n' "# Not uploaded to Debian: there is no Debian bug to close." \
  "postgresql-15-hmr: initial-upload-closes-no-bugs [usr/share/doc/postgresql-15-hmr/changelog.Debian.gz:1]" \
  > "$ext/usr/share/lintian/overrides/postgresql-15-hmr"
chmod 0644 "$ext/usr/share/lintian/overrides/postgresql-15-hmr"
cat > "$ext/DEBIAN/control" <<EOF
Package: postgresql-15-hmr
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Section: database
Priority: optional
Depends: postgresql-15, libc6, libgcc-s1
Homepage: https://example.invalid/hmr
Description: hmr: the city test-result mutual-recognition platform, in the HIS database
 PostgreSQL 15 extension: outbox capture triggers, source views, the recognition
 services as SQL functions (hmr_check_prescription, hmr_list_recognitions, ...)
 and the gate a HIS stored procedure enforces. After installing or upgrading,
 run ALTER EXTENSION hmr UPDATE in each database that has it (README).
EOF
cat > "$ext/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  echo "postgresql-15-hmr: in each database with hmr, run: ALTER EXTENSION hmr UPDATE;"
  echo "  (open sessions keep the library they loaded; new sessions load this one)"
fi
EOF
chmod 0755 "$ext/DEBIAN/postinst"
dpkg-deb --root-owner-group -Zxz --build "$ext" "$out/postgresql-15-hmr_${debversion}_${arch}.deb" >/dev/null

# ------------------------------------------------------------------ hmr-worker
wk=$stage/hmr-worker
install -d -m 0755 "$wk/DEBIAN" "$wk/usr/bin" "$wk/lib/systemd/system" "$wk/usr/share/hmr" \
  "$wk/usr/share/doc/hmr-worker/examples"
install -d -m 0750 "$wk/etc/hmr"
install -m 0755 -s target/release/hmr-worker target/release/hmr-platform-sim "$wk/usr/bin/"
for unit in hmr-worker hmr-serve; do
  sed 's#/usr/local/bin/hmr-worker#/usr/bin/hmr-worker#' "worker/deploy/$unit.service" > "$wk/lib/systemd/system/$unit.service"
  chmod 0644 "$wk/lib/systemd/system/$unit.service"
done
# The hospital's configuration: conffiles, so an upgrade keeps what the hospital wrote.
install -m 0600 worker/deploy/worker.example.toml "$wk/etc/hmr/worker.toml"
install -m 0600 worker/deploy/worker.example.toml "$wk/etc/hmr/serve.toml"
install -m 0644 worker/deploy/worker.example.toml "$wk/usr/share/doc/hmr-worker/examples/worker.toml"
install -m 0644 worker/deploy/grafana-dashboard.json "$wk/usr/share/doc/hmr-worker/examples/"
install -m 0644 sql/catalog-sample.csv "$wk/usr/share/hmr/catalog-sample.csv"
install -d -m 0755 "$wk/usr/share/hmr/sql"
cp -r sql/demo sql/examples "$wk/usr/share/hmr/sql/"
find "$wk/usr/share/hmr/sql" -type d -exec chmod 0755 {} + ; find "$wk/usr/share/hmr/sql" -type f -exec chmod 0644 {} +
docs hmr-worker "$wk"
# What lintian flags on purpose, each with its reason (lintian --show-overrides lists them).
install -d -m 0755 "$wk/usr/share/lintian/overrides"
cat > "$wk/usr/share/lintian/overrides/hmr-worker" <<'OVERRIDES'
# The configuration holds the platform's credentials: readable by the service user only.
hmr-worker: non-standard-dir-perm 0750 != 0755 [etc/hmr/]
hmr-worker: non-standard-file-perm 0600 != 0644 [etc/hmr/serve.toml]
hmr-worker: non-standard-file-perm 0600 != 0644 [etc/hmr/worker.toml]
# Documented in README.md and by --help; no man pages yet.
hmr-worker: no-manual-page [usr/bin/hmr-platform-sim]
hmr-worker: no-manual-page [usr/bin/hmr-worker]
# Not uploaded to Debian: there is no Debian bug to close.
hmr-worker: initial-upload-closes-no-bugs [usr/share/doc/hmr-worker/changelog.Debian.gz:1]
OVERRIDES
chmod 0644 "$wk/usr/share/lintian/overrides/hmr-worker"
printf '/etc/hmr/worker.toml\n/etc/hmr/serve.toml\n' > "$wk/DEBIAN/conffiles"
cat > "$wk/DEBIAN/control" <<EOF
Package: hmr-worker
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Section: net
Priority: optional
Depends: libc6, libgcc-s1, adduser, init-system-helpers (>= 1.56)
Recommends: postgresql-15-hmr
Homepage: https://example.invalid/hmr
Description: hmr worker: the HIS outbox to the city mutual-recognition platform
 hmr-worker drains the hmr extension's outbox to the city platform (run), and
 serves CDS Hooks, a JSON API and a widget to workstations (serve). Includes
 hmr-platform-sim, the platform simulator for rehearsing go-live (联调) offline.
EOF
cat > "$wk/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd hmr >/dev/null; then
    adduser --system --group --home /var/lib/hmr --no-create-home --quiet hmr
  fi
  # The configuration holds secrets: the service user's alone (the worker refuses others).
  chown root:hmr /etc/hmr && chmod 0750 /etc/hmr
  for f in /etc/hmr/worker.toml /etc/hmr/serve.toml; do
    [ -f "$f" ] && chown hmr:hmr "$f" && chmod 0600 "$f"
  done
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
    # Restarted only if it was running (an upgrade); never started on a first install.
    deb-systemd-invoke try-restart hmr-worker.service hmr-serve.service >/dev/null || true
  fi
fi
EOF
cat > "$wk/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# On removal stop the services; on upgrade leave them running (postinst restarts them).
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  deb-systemd-invoke stop hmr-worker.service hmr-serve.service >/dev/null 2>&1 || true
fi
EOF
cat > "$wk/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
# Purging removes the configuration (conffiles) and nothing else: the HIS database's hmr
# schema, its outbox and kept reports are the database's (README: before DROP EXTENSION).
if [ "$1" = purge ]; then
  rm -rf /etc/hmr
  if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
fi
EOF
chmod 0755 "$wk/DEBIAN/postinst" "$wk/DEBIAN/prerm" "$wk/DEBIAN/postrm"
dpkg-deb --root-owner-group -Zxz --build "$wk" "$out/hmr-worker_${debversion}_${arch}.deb" >/dev/null

# What a release carries: both packages and their checksums (attach target/debian/* to it).
(cd "$out" && sha256sum ./*_"${debversion}"_*.deb > "SHA256SUMS-$debversion")
ls -l "$out"/*_"${debversion}"_*.deb "$out/SHA256SUMS-$debversion"
if $run_lintian; then
  echo "== lintian (tags flagged on purpose are overridden in the package, each with its reason)"
  lintian --fail-on error,warning "$out"/*_"${debversion}"_*.deb
fi
