"""docker/: the compose files against the Compose specification's JSON schema (shipped in
docker/schemas/, validated with the pinned ``jsonschema``), what the stack promises (every
service on the default profile, start order gated by health, secrets only from files, pinned
images, a drain shorter than the stop grace period), the Dockerfile's stages and user, and
scripts/start.sh against a stand-in ``docker`` (no Docker daemon on the test machines).
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
GPU = DOCKER / "docker-compose.gpu.yml"
SCHEMA = json.loads((DOCKER / "schemas" / "compose-spec.json").read_text())

DEFAULT_SERVICES = {
    "postgres", "redis", "clamav", "migrate", "web", "worker", "worker-ocr", "celery", "beat",
    "prometheus", "grafana",
}  # fmt: skip


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def schema_errors(document: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("path", [COMPOSE, GPU], ids=lambda p: p.name)
def test_the_compose_files_follow_the_compose_specification(path):
    assert schema_errors(load(path)) == []


def test_the_schema_check_rejects_what_compose_would():
    broken = load(COMPOSE)
    broken["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_finished"
    broken["services"]["worker"]["healthcheck"]["intervall"] = "10s"
    errors = schema_errors(broken)
    assert any("service_finished" in e for e in errors)
    assert any("intervall" in e for e in errors)


def test_the_default_profile_runs_the_whole_stack_and_health_gates_the_start_order():
    services = load(COMPOSE)["services"]
    assert set(services) == DEFAULT_SERVICES
    assert not [name for name, s in services.items() if s.get("profiles")]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
    # Migrations run once, before everything that uses the database.
    assert services["migrate"]["command"][-2:] == ["migrate", "--no-input"]
    assert services["migrate"]["restart"] == "no"
    for name in ("web", "celery", "beat"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }
    # The workers serve the tiny model and ocr-lite; their readiness is the metrics /ready.
    assert services["worker"]["command"][3:5] == ["--model", "glm-4.6v-flash"]
    assert services["worker-ocr"]["command"][3:5] == ["--model", "ocr-lite"]
    for name in ("worker", "worker-ocr"):
        worker = services[name]
        assert "9400/ready" in " ".join(worker["healthcheck"]["test"])
        assert worker["environment"]["INFERENCE_METRICS_PORT"] == "9400"
        drain = float(worker["command"][worker["command"].index("--drain-seconds") + 1])
        assert drain < _seconds(worker["stop_grace_period"])
    assert "web" in services["web"]["environment"]["DJANGO_ALLOWED_HOSTS"].split(",")


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_secrets_come_only_from_files():
    for path in (COMPOSE, GPU):
        document = load(path)
        declared = set(document.get("secrets", {}))
        for secret in document.get("secrets", {}).values():
            assert secret["file"].startswith("./secrets/")
        for name, service in document["services"].items():
            assert set(service.get("secrets", [])) <= declared | set(load(COMPOSE)["secrets"]), name
            for variable, value in (service.get("environment") or {}).items():
                if re.search(r"SECRET|PASSWORD|TOKEN|DATABASE_URL", variable):
                    assert variable.endswith("_FILE"), (name, variable)
                    assert str(value).startswith("/run/secrets/"), (name, variable)
    assert (DOCKER / ".gitignore").read_text().split() == ["secrets/"]


def test_images_are_pinned_releases():
    for path in (COMPOSE, GPU):
        for name, service in load(path)["services"].items():
            image = service.get("image", "")
            if "build" in service or not image:
                continue  # built here from the pinned Dockerfile
            assert re.search(r":v?\d+\.\d+(\.\d+)?", image), (name, image)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for base in re.findall(r"^ARG \w+_IMAGE=(\S+)", dockerfile, re.M):
        assert re.search(r":\d+\.\d+\.\d+-", base), base


def test_the_image_is_multi_stage_and_runs_as_a_user():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M)
    assert len(stages) >= 3 and stages[-1] == "runtime"
    runtime = dockerfile.split("AS runtime", 1)[1]
    users = re.findall(r"^USER (\S+)", runtime, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "COPY --from=python-deps /opt/venv" in runtime
    assert "npm" not in runtime.replace("node_modules", "")  # no npm in the runtime stage


def test_the_gpu_override_runs_the_real_checkpoint_on_a_gpu():
    worker = load(GPU)["services"]["worker"]
    models = json.loads(worker["environment"]["INFERENCE_MODELS"])
    assert models["glm-4.6v-flash"]["device"] == "cuda"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    base = load(COMPOSE)["services"]
    for name, service in load(GPU)["services"].items():
        assert name in base  # overrides only, no service of its own
        if name != "worker":
            assert json.loads(service["environment"]["INFERENCE_MODELS"]) == models


def test_prometheus_in_the_stack_scrapes_the_services_of_the_stack():
    config = load(ROOT / "monitoring" / "prometheus" / "prometheus.yml")
    services = load(COMPOSE)["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["web"]["static_configs"][0]["targets"] == ["web:8000"]
    names = jobs["inference-worker"]["dns_sd_configs"][0]["names"]
    assert set(names) == {"worker", "worker-ocr"} and all(n in services for n in names)
    mount = services["prometheus"]["volumes"][0]
    assert mount.startswith("../monitoring/prometheus:")


# --- scripts/start.sh with a stand-in docker ----------------------------------------------

FAKE_DOCKER = r"""#!/usr/bin/env bash
# Records its arguments; answers as `docker compose` would for the scenario in $FAKE_STATE.
echo "$*" >>"$FAKE_LOG"
args=" $* "
case "$args" in
  *" compose version "*) echo "Docker Compose version v2.30.0" ;;
  " info "*) echo '{"runc":{}}' ;;
  *" ps -a --format "*)
    if [ "$(cat "$FAKE_STATE")" = migrate-failed ]; then
      printf 'postgres|running|healthy|0\nmigrate|exited||1\nweb|created||0\n'
    else
      printf 'postgres|running|healthy|0\nmigrate|exited||0\nweb|running|healthy|0\n'
    fi ;;
  *" ps -a "*) echo "NAME SERVICE STATUS" ;;
  *" logs "*) echo "LOG OF ${@: -1}: django.db.utils.OperationalError: boom" ;;
  *" exec -T web python manage.py demo_setup "*) echo " API key:       sk-demo-0123" ;;
esac
exit 0
"""


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_env(tmp_path):
    """A PATH with the stand-in docker (and no nvidia-smi), a ready endpoint, and a copy of
    the scripts and compose files so docker/secrets/ is made in a scratch checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "docker").mkdir()
    (checkout / "scripts" / "start.sh").write_text((ROOT / "scripts" / "start.sh").read_text())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(tmp_path / "docker.log"),
        "FAKE_STATE": str(tmp_path / "state"),
        "WEB_PORT": str(server.server_address[1]),
        "START_TIMEOUT": "20",
    }
    yield checkout, env, tmp_path
    server.shutdown()
    server.server_close()


def _start(checkout: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "start.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_start_creates_secrets_starts_the_cpu_stack_and_prints_where_to_go(fake_env):
    checkout, env, tmp = fake_env
    (tmp / "state").write_text("ok")
    _Ready.status = 200
    out = _start(checkout, env)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = (tmp / "docker.log").read_text()
    assert "compose -f docker/docker-compose.yml up -d --build" in calls
    assert "docker-compose.gpu.yml" not in calls  # no nvidia-smi here
    assert "sk-demo-0123" in out.stdout
    assert f"http://localhost:{env['WEB_PORT']}/" in out.stdout and "Grafana" in out.stdout
    secrets = checkout / "docker" / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    password = (secrets / "postgres_password").read_text()
    assert len(password) >= 32
    assert (secrets / "database_url").read_text() == (
        f"postgres://platform:{password}@postgres:5432/platform"
    )
    # Run again: the secrets are kept, not replaced.
    assert _start(checkout, env).returncode == 0
    assert (secrets / "postgres_password").read_text() == password


def test_start_on_a_failed_migration_prints_its_last_log_lines_and_fails(fake_env):
    checkout, env, tmp = fake_env
    (tmp / "state").write_text("migrate-failed")
    _Ready.status = 503
    out = _start(checkout, env)
    assert out.returncode == 1
    assert "LOG OF migrate: django.db.utils.OperationalError: boom" in out.stderr
    assert "LOG OF web" in out.stderr  # created, never started: shown too
    assert "LOG OF postgres" not in out.stderr  # healthy: not noise
    assert "sk-demo" not in out.stdout


def test_start_picks_the_gpu_override_when_a_gpu_and_the_nvidia_runtime_are_there(fake_env):
    checkout, env, tmp = fake_env
    (tmp / "state").write_text("ok")
    _Ready.status = 200
    bin_dir = Path(env["PATH"].split(":")[0])
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\n")
    smi.chmod(0o755)
    docker = bin_dir / "docker"
    docker.write_text(docker.read_text().replace('{"runc":{}}', '{"nvidia":{},"runc":{}}'))
    out = _start(checkout, env)
    assert out.returncode == 0, out.stderr
    assert "-f docker/docker-compose.gpu.yml up -d --build" in (tmp / "docker.log").read_text()
    assert "GPU" in out.stdout
    out = _start(checkout, {**env, "PLATFORM_GPU": "0"})
    assert "CPU" in out.stdout


def test_no_port_of_the_stack_is_taken_twice():
    ports = []
    for service in load(COMPOSE)["services"].values():
        ports += [p.rsplit(":", 1)[0] for p in service.get("ports", [])]
    assert len(ports) == len(set(ports)) == 3  # web, Prometheus, Grafana
