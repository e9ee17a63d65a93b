"""Probes (/health/live, /health/ready), the OpenAPI schema and the API docs page."""

from __future__ import annotations

import json
import re

import httpx
from django.core.management import call_command

pytest_plugins = ["tests.webplatform.live_server"]  # live_asgi_server and friends


def test_liveness_answers_while_the_process_serves_http(live_asgi_server):
    response = httpx.get(live_asgi_server.url + "/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readiness_checks_database_redis_and_a_worker_of_every_model(live_asgi_server, settings):
    response = httpx.get(live_asgi_server.url + "/health/ready", timeout=10)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    checks = body["checks"]
    assert set(checks) == {"database", "redis", *(f"model:{m}" for m in settings.INFERENCE_MODELS)}
    assert all(check["ok"] for check in checks.values())
    assert checks["model:glm-4.6v-flash"]["live_workers"] >= 1


def test_readiness_fails_when_a_model_has_no_live_worker(
    live_asgi_server, redis_inference_without_workers
):
    response = httpx.get(live_asgi_server.url + "/health/ready", timeout=10)

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is True
    model = body["checks"]["model:glm-4.6v-flash"]
    assert model["ok"] is False
    assert model["live_workers"] == 0


def test_the_openapi_schema_is_json_and_documents_chat_completions(live_asgi_server):
    response = httpx.get(live_asgi_server.url + "/v1/openapi.json")

    assert response.status_code == 200
    schema = json.loads(response.content)  # JSON, not the YAML drf-spectacular defaults to
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    assert operation["operationId"] == "createChatCompletion"
    assert operation["security"] == [{"ApiKeyAuth": []}]
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["ApiKeyAuth"]["description"],
    }
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ChatCompletion"}
    assert {"400", "401", "429", "503"} <= set(operation["responses"])
    assert {"/v1/models", "/v1/models/{model_id}", "/v1/usage"} <= set(schema["paths"])
    assert not any(path.endswith("/") for path in schema["paths"])


def test_the_docs_page_loads_nothing_from_outside_the_platform(live_asgi_server):
    response = httpx.get(live_asgi_server.url + "/v1/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "redoc" in html.lower()
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html), "an external URL"
    scripts = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)
    assert scripts and all(src.startswith("/static/") for src in scripts)


def test_the_schema_validates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yml"))

    assert "/v1/chat/completions" in (tmp_path / "s.yml").read_text()


def test_the_docs_describe_the_chat_request_and_answer_for_customers(live_asgi_server):
    schema = json.loads(httpx.get(live_asgi_server.url + "/v1/openapi.json").content)
    components = schema["components"]["schemas"]

    messages = components["ChatCompletionRequest"]["properties"]["messages"]
    assert messages["type"] == "array"
    assert messages["items"]["discriminator"]["propertyName"] == "role"
    user_content = components["UserMessage"]["properties"]["content"]["oneOf"]
    assert {"type": "string"} in user_content
    parts = next(alt for alt in user_content if alt.get("type") == "array")["items"]["oneOf"]
    assert {"$ref": "#/components/schemas/ImageUrlPart"} in parts
    ok = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    # A stream is described as the events SSE tools read, each `data` a chunk's JSON.
    assert ok["text/event-stream"]["schema"]["required"] == ["data"]
    assert "ChatCompletionChunk" in ok["text/event-stream"]["schema"]["description"]
    assert "ChatCompletionChunk" in components
    # Written for API users: no maintainer's notes, module paths or class names.
    text = json.dumps(schema)
    for internal in ("adrf", "``", "tenants.", "webplatform", "Serializer"):
        assert internal not in text, internal
