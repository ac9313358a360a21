# A throwaway PostgreSQL server for the tests, sourced by .ci/run (and usable by hand: `source .ci/pg.sh; pg_start`).
# pg_start: Debian's postgresql package if no server is installed, then a cluster of our own in a temp folder on a
# free loopback port (picked by the kernel; tried again if another process takes it first), trust auth, run as the
# postgres user when we are root; exports MAE_LAB_TEST_PG, PG_BIN and PG_DIR. pg_stop: stop it and delete the folder.
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_start() {
  if [ -z "$(pg_bin)" ]; then
    echo "installing PostgreSQL (Debian's postgresql package)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  PG_BIN="$(pg_bin)"
  PG_DIR="$(mktemp -d /tmp/mae-lab-pg.XXXXXX)"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR"; fi
  as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -A trust -U postgres >/dev/null
  local port tries
  for tries in 1 2 3 4 5; do
    port="${MAE_LAB_PG_PORT:-$(free_port)}"
    if as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null
    then
      export PG_BIN PG_DIR MAE_LAB_TEST_PG="postgresql://postgres@127.0.0.1:$port/postgres"
      echo "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') for the tests at $MAE_LAB_TEST_PG"
      return 0
    fi
    [ -n "${MAE_LAB_PG_PORT:-}" ] && break
  done
  echo "PostgreSQL did not start:" >&2; tail -n 5 "$PG_DIR/server.log" >&2
  return 1
}

pg_stop() {
  [ -n "${PG_DIR:-}" ] || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
