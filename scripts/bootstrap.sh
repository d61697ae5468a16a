#!/usr/bin/env bash
# Takes a fresh Debian 12 machine (root, package registries only) to ready for hmr:
# PostgreSQL 15 with server headers, clang for pgrx bindgen, cargo-pgrx 0.18.1, `cargo pgrx init`.
# Idempotent: every step checks before it acts, so a second run takes about a second.
set -euo pipefail

PGRX_VERSION=0.18.1
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config libssl-dev sudo
              poppler-utils fonts-wqy-microhei curl pgbouncer shellcheck
              mariadb-server postgresql-15-mysql-fdw chromium chromium-driver openssl
              postgresql-15-pgq3 bc debootstrap dpkg-dev lintian)

log() { printf '[bootstrap] %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Do not let the package create and start a system cluster: our tests never use one.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/hmr-no-main.conf
  # Nor start any service (pgbouncer's, MariaDB's): tests start their own, on their own sockets.
  made_policy=false
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=true
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if $made_policy; then rm -f /usr/sbin/policy-rc.d; fi
else
  log "apt packages present"
fi

if ! command -v cargo >/dev/null; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION"; then
  log "installing cargo-pgrx $PGRX_VERSION (about 4 minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
else
  log "cargo-pgrx $PGRX_VERSION present"
fi

if ! grep -qs "pg15" "$HOME/.pgrx/config.toml"; then
  log "cargo pgrx init (system PostgreSQL 15)"
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
else
  log "pgrx initialised"
fi
log "ready"
