"""monitoring/: the alert rules, the Grafana dashboard and a real Prometheus.

- ``promtool check`` accepts the rules and the compose stack's Prometheus configuration, and
  ``promtool test rules`` runs the alerts' unit tests (monitoring/prometheus/alerts_test.yml:
  every alert fires on synthetic series that should raise it and not on healthy ones).
- A running worker PROCESS (the tiny GLM-4.6V model on the CPU, ``--metrics-port``) and the
  web side (uvicorn serving ``webplatform.asgi`` in a thread of this process, on the Redis
  transport, sending to that worker) answer real completions; then every metric named by a
  dashboard panel or an alert rule is in their live expositions.
- Debian's Prometheus scrapes both, loads the alert rules, and answers queries over what it
  scraped.

Prometheus and promtool come from Debian's ``prometheus`` package (scripts/test-services.sh
installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.monitoring.conftest import free_port
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
MODEL = "glm-4.6v-flash"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: scripts/test-services.sh installs Debian's prometheus")
    return path


# --- rules and configuration ----------------------------------------------------------------


def test_promtool_accepts_the_rules_and_the_stack_configuration():
    promtool = _tool("promtool")
    for args in (
        ["check", "rules", str(RULES)],
        ["check", "config", str(MONITORING / "prometheus" / "prometheus.yml")],
    ):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_the_alert_unit_tests_pass():
    promtool = _tool("promtool")
    out = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=MONITORING / "prometheus",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (RULES.parent / "alerts_test.yml").read_text()))
    assert tested == set(_alert_names())  # no alert without a test


def _alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


# --- which metrics the dashboards and the rules name --------------------------------------

_PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a small lexer: enough for ours)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name = match.group(0)
        following = expr[match.end() :].lstrip()[:1]
        if following == "(" or name.lower() in _PROMQL_WORDS or name.startswith("$"):
            continue  # a function, a keyword or a Grafana variable
        if expr[match.start() - 1 : match.start()] == "$":
            continue
        names.add(name)
    return names


def test_the_lexer_finds_metric_names_and_nothing_else():
    expr = (
        'histogram_quantile(0.95, sum by (model_name, le) (rate(a:b_bucket{x="y:z"}[5m])))'
        ' / on (instance) c_total{model_name=~"$model"} > bool 2 and up'
    )
    assert metric_names(expr) == {"a:b_bucket", "c_total", "up"}


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if isinstance(query, dict):
                query = query.get("query", "")
            if query:
                exprs.append(re.sub(r"label_values\(([^,)]+).*", r"\1", query))
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_dashboard_has_the_panels_an_operator_opens_first():
    assert DASHBOARDS
    titles = {p["title"] for path in DASHBOARDS for p in json.loads(path.read_text())["panels"]}
    for wanted in (
        "Tokens /s",
        "Time to first token",
        "Queue lag (oldest untaken request)",
        "KV cache use",
        "Errors by code /s",
        "Workers alive",
        "GPU memory",
    ):
        assert wanted in titles
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "prometheus"  # the provisioned one


# --- a worker process and the web side, live --------------------------------------------


def _complete(base: str, key: str, *, stream: bool, image: bool) -> None:
    content: list[dict] = [{"type": "text", "text": "What is in this image?"}]
    if image:
        png = corpus.encode(corpus.solid(corpus.RED, (64, 48)), "PNG")
        content.append({"type": "image_url", "image_url": {"url": corpus.data_uri(png)}})
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0.7,  # not cached: every request reaches the worker
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", base + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        text = response.read().decode()
        assert response.status_code == 200, text
        if stream:
            assert text.rstrip().endswith("data: [DONE]"), text


def _exposed(url: str) -> set[str]:
    text = httpx.get(url, timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _serve_some(base: str, key: str) -> None:
    for stream, image in ((True, True), (False, True), (True, False)):
        _complete(base, key, stream=stream, image=image)


def _refuse_cache_and_fall_back(base: str, key: str, settings) -> None:  # type: ignore[no-untyped-def]
    """The completion path's other events: an admission refused, an image refused (a
    completion error), an answer-cache lookup, and a fallback (a second served model with no
    worker falls back to MODEL, whose worker answers)."""
    from inference.client import reset_inference_client
    from tests.factories import PlanFactory, TenantFactory, api_key_for

    headers = {"Authorization": f"Bearer {key}"}
    text = {"role": "user", "content": "Hi"}
    for body, status in (
        ({"model": MODEL, "messages": [text], "max_tokens": 10**6}, 400),
        ({"model": MODEL, "messages": [text], "max_tokens": 4, "temperature": 0}, 200),
    ):
        response = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == status, response.text
    bad = {"type": "image_url", "image_url": {"url": corpus.data_uri(b"no image")}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [bad]}], "max_tokens": 4}
    response = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.json()["error"]["code"] == "unsupported_image_type"

    settings.INFERENCE_MODELS = {**settings.INFERENCE_MODELS, "spare-model": {}}
    reset_inference_client()
    spare_key = api_key_for(TenantFactory(plan=PlanFactory(fallback_model=MODEL))).raw_key
    body = {"model": "spare-model", "messages": [text], "max_tokens": 4}
    response = httpx.post(
        base + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {spare_key}"},
        timeout=60,
    )
    assert (response.status_code, response.json()["model"]) == (200, MODEL), response.text


@pytest.mark.redis
@pytest.mark.slow
def test_every_metric_a_panel_or_an_alert_names_is_exposed_by_a_running_web_and_worker(
    web, worker, settings
):
    server, key = web
    _serve_some(server.url, key)
    _refuse_cache_and_fall_back(server.url, key, settings)
    time.sleep(0.8)  # a heartbeat after the last request: the engine snapshot is current
    exposed = _exposed(server.url + "/metrics") | _exposed(worker.base + "/metrics")
    named = set().union(*(metric_names(e) for e in dashboard_exprs() + rule_exprs()))
    named.discard("up")  # Prometheus's own, per target
    assert len(named) > 25
    assert named - exposed == set()


@pytest.mark.redis
@pytest.mark.slow
def test_prometheus_scrapes_the_web_side_and_a_worker_and_answers_queries(web, worker, tmp_path):
    prometheus = _tool("prometheus")
    server, key = web
    shutil.copy(RULES, tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "web", "static_configs": [{"targets": [server.url.split("//")[1]]}]},
            {
                "job_name": "inference-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{worker.metrics_port}"]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[dict]:
        url = api + "/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def eventually(expr: str, check, timeout: float = 30.0) -> list[dict]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                result = query(expr)
                if check(result):
                    return result
            except OSError:
                result = None  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} never satisfied the check; last: {result}")
            time.sleep(0.25)

    try:
        up = eventually("up", lambda r: len(r) == 2 and all(s["value"][1] == "1" for s in r))
        assert {s["metric"]["job"] for s in up} == {"web", "inference-worker"}
        before = float(
            eventually("sum(inference:generation_tokens_total)", lambda r: len(r) == 1)[0]["value"][
                1
            ]
        )
        _serve_some(server.url, key)
        # Over the scraped data: the tokens of the requests just served, and the web side's
        # view of the same worker.
        eventually(
            "sum(inference:generation_tokens_total)",
            lambda r: r and float(r[0]["value"][1]) >= before + 3,
        )
        eventually(
            f'max by (model) (platform_model_live_workers{{model="{MODEL}"}})',
            lambda r: r and r[0]["value"][1] == "1",
        )
        eventually(
            'sum(increase(platform_completion_requests_total{status="ok"}[1m]))',
            lambda r: r and float(r[0]["value"][1]) > 0,
        )
        eventually(
            "histogram_quantile(0.5, sum by (le) "
            "(rate(inference:time_to_first_token_seconds_bucket[1m])))",
            lambda r: r and 0 < float(r[0]["value"][1]) < 60,
        )

        def rules() -> dict[str, dict]:
            with urllib.request.urlopen(api + "/rules", timeout=5) as resp:
                groups = json.load(resp)["data"]["groups"]
            return {rule["name"]: rule for g in groups for rule in g["rules"]}

        deadline = time.monotonic() + 20
        while not all(r.get("lastEvaluation", "0001").startswith("20") for r in rules().values()):
            assert time.monotonic() < deadline, rules()
            time.sleep(0.25)
        loaded = rules()
        assert set(loaded) == set(_alert_names())
        assert {r["health"] for r in loaded.values()} == {"ok"}, loaded  # they evaluate
        # The model with a live worker raises no alarm. (The web process's registry is the
        # test process's: models of earlier tests may linger there with no worker.)
        assert query(f'ALERTS{{alertname="ModelNoLiveWorker", model="{MODEL}"}}') == []
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
