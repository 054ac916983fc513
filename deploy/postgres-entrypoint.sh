#!/bin/sh
# The entry point of the `postgres` image (Dockerfile): Debian's PostgreSQL 15 as the face
# gallery's shared store (deploy/docker-compose.postgres.yml). Runs as the postgres user.
# On the first start (an empty $PGDATA volume) it makes the cluster: superuser and database
# `arcface` (POSTGRES_USER, POSTGRES_DB), password $PGPASSWORD (from the compose env file,
# never the image), password (SCRAM) logins from the network. Then postgres runs as PID 1
# (SIGTERM: a clean shutdown); arguments are added to its command line (say, `-c max_connections=200`).
set -eu

: "${PGDATA:?}"
: "${PGPASSWORD:?set PGPASSWORD (deploy/gallery-postgres.env, see its .example)}"
user=${POSTGRES_USER:-arcface}
db=${POSTGRES_DB:-arcface}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp)
  printf '%s\n' "$PGPASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" |
      postgres --single -D "$PGDATA" -c "listen_addresses=" postgres >/dev/null
  fi
  echo "postgres-entrypoint: made the cluster (user and database '$user'/'$db')" >&2
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
