#!/usr/bin/env bash
# Start the whole platform with Docker Compose and say where to open it:
#
#   bash scripts/start.sh            # GPU if there is a usable one, else the CPU stack
#   PLATFORM_GPU=0 bash scripts/start.sh    # the CPU stack even on a GPU host
#   bash scripts/start.sh down       # stop it (volumes kept; add -v to docker compose to drop them)
#
# 1. picks the stack: docker/docker-compose.yml, plus docker/docker-compose.gpu.yml when
#    nvidia-smi lists a GPU and Docker has the NVIDIA runtime;
# 2. creates docker/secrets/ with random secrets when missing (never overwritten);
# 3. builds and starts everything (`up -d --build`);
# 4. waits for the web side's /health/ready (database, Redis and a live worker of every
#    model), at most START_TIMEOUT seconds (default 900: the first ClamAV and image builds);
# 5. prints the site, Grafana and Prometheus addresses and a fresh demo API key;
#    on failure, the state of every service and the last log lines of the failing ones.
set -euo pipefail
cd "$(dirname "$0")/.."

WEB_PORT=${WEB_PORT:-8000}
GRAFANA_PORT=${GRAFANA_PORT:-3000}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
START_TIMEOUT=${START_TIMEOUT:-900}
LOG_LINES=${LOG_LINES:-40}
export WEB_PORT GRAFANA_PORT PROMETHEUS_PORT

say() { echo "start: $*" >&2; }

compose=(docker compose -f docker/docker-compose.yml)
gpu_usable() {
  [ "${PLATFORM_GPU:-auto}" != 0 ] || return 1
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || return 1
  docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia
}
if gpu_usable; then
  compose+=(-f docker/docker-compose.gpu.yml)
  profile="GPU (docker/docker-compose.gpu.yml: the real checkpoint from ${MODELS_DIR:-/srv/models})"
else
  profile="CPU (the tiny model and ocr-lite)"
fi

if [ "${1:-up}" = down ]; then
  "${compose[@]}" down
  exit 0
fi

command -v docker >/dev/null 2>&1 || { say "docker is not installed"; exit 1; }
docker compose version >/dev/null 2>&1 || { say "the docker compose plugin is missing"; exit 1; }

# --- secrets: random, created once, readable by the containers' users -----------------------
secrets=docker/secrets
mkdir -p "$secrets"
chmod 700 "$secrets"   # the host's other users cannot reach the files below
new_secret() { head -c 48 /dev/urandom | base64 | tr -d '/+=\n' | head -c 50; }
for name in django_secret_key api_key_hmac_secret postgres_password grafana_admin_password; do
  if [ ! -s "$secrets/$name" ]; then
    new_secret >"$secrets/$name"
    say "created $secrets/$name"
  fi
done
if [ ! -s "$secrets/database_url" ]; then
  printf 'postgres://platform:%s@postgres:5432/platform' "$(cat "$secrets/postgres_password")" \
    >"$secrets/database_url"
fi
# Compose mounts these files as they are (no uid mapping outside Swarm): the app (uid 10001),
# Grafana and PostgreSQL must read them; the 0700 folder keeps them from the host's users.
chmod 644 "$secrets"/*

# --- start --------------------------------------------------------------------------------
say "starting the $profile stack"
"${compose[@]}" up -d --build

show_failures() {
  say "the platform did not become ready; services:"
  "${compose[@]}" ps -a >&2 || true
  local failing
  failing=$("${compose[@]}" ps -a --format '{{.Service}}|{{.State}}|{{.Health}}|{{.ExitCode}}' |
    awk -F'|' '$2 != "running" && !($1 == "migrate" && $2 == "exited" && $4 == 0) {print $1; next}
         $3 == "unhealthy" || $3 == "starting" {print $1}' | sort -u)
  [ -n "$failing" ] || failing=web   # all up, yet not ready: the web side says why
  for service in $failing; do
    echo "----- last $LOG_LINES log lines of $service -----" >&2
    "${compose[@]}" logs --no-color --tail "$LOG_LINES" "$service" >&2 || true
  done
  curl -fsS "http://127.0.0.1:$WEB_PORT/health/ready" >&2 2>/dev/null || true
}

ready_url="http://127.0.0.1:$WEB_PORT/health/ready"
deadline=$((SECONDS + START_TIMEOUT))
say "waiting for $ready_url (at most ${START_TIMEOUT}s)"
until curl -fsS -o /dev/null "$ready_url" 2>/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    show_failures
    exit 1
  fi
  # A one-shot that failed (migrations) or a service that exited will not recover by waiting.
  if "${compose[@]}" ps -a --format '{{.Service}}|{{.State}}|{{.ExitCode}}' |
    awk -F'|' '$2 == "exited" && $3 != 0 {bad=1} END {exit !bad}'; then
    show_failures
    exit 1
  fi
  sleep 3
done

# --- where to open it ---------------------------------------------------------------------
"${compose[@]}" exec -T web python manage.py demo_setup --host localhost --port "$WEB_PORT"
cat <<EOF
The platform is ready ($profile).
  Site and API:  http://localhost:$WEB_PORT/   (OpenAI base_url: http://localhost:$WEB_PORT/v1)
  Grafana:       http://localhost:$GRAFANA_PORT/   (admin / the password in $secrets/grafana_admin_password)
  Prometheus:    http://localhost:$PROMETHEUS_PORT/
  Logs:          ${compose[*]} logs -f web worker
  Stop:          bash scripts/start.sh down
EOF
