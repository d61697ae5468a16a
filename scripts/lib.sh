# Shared by the scripts: paths and the throwaway-cluster helpers.
# shellcheck shell=bash
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
export PATH="$HOME/.cargo/bin:$PATH"

as_postgres() { runuser -u postgres -- "$@"; }

# start_cluster DIR PORT: initdb in DIR/data as postgres, unix socket in DIR only.
start_cluster() {
  local dir=$1 port=$2
  rm -rf "$dir"; mkdir -p "$dir"; chown postgres "$dir"
  as_postgres "$PG_BIN/initdb" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync -D "$dir/data" >/dev/null
  as_postgres "$PG_BIN/pg_ctl" -w -D "$dir/data" -l "$dir/postgres.log" \
    -o "-p $port -k $dir -c listen_addresses='' -c fsync=off" start >/dev/null
}

stop_cluster() {
  local dir=$1
  if [ -d "$dir/data" ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  fi
}

# Builds the worker and simulator, and installs the extension into PostgreSQL 15.
build_all() {
  cargo build --quiet -p hmr-worker -p hmr-platform-sim
  (cd extension && cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null)
}
