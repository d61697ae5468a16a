#!/bin/sh
# First start of the container: the extension and, for the compose demo, the sample HIS.
set -e
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "CREATE EXTENSION IF NOT EXISTS hmr"
if [ "${HMR_DEMO_SCHEMA:-0}" = "1" ]; then
  for f in /docker-entrypoint-initdb.d/demo/*.sql; do
    psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f "$f"
  done
fi
