#!/bin/bash
# Entrypoint of the postgres stand-in (postgres.Dockerfile): the official image's contract.
set -euo pipefail
if [ "${1:-}" != postgres ]; then exec "$@"; fi
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres stand-in: POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    # The initialisation server: a private socket only, so that nothing (healthcheck, clients)
    # takes it for the real one.
    socket=$(mktemp -d)
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=$socket" -w start
    psql=(psql -v ON_ERROR_STOP=1 -h "$socket" -U "$user" --no-psqlrc)
    if [ "$db" != postgres ]; then
        "${psql[@]}" -d postgres -c "CREATE DATABASE \"$db\";"
    fi
    for file in /docker-entrypoint-initdb.d/*; do
        case "$file" in
            *.sql) echo "postgres stand-in: running $file"; "${psql[@]}" -d "$db" -f "$file" ;;
            *.sh) echo "postgres stand-in: sourcing $file"; PGHOST=$socket . "$file" ;;
            *) ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    rmdir "$socket"
fi
exec "$@"
