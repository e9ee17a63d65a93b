"""The virus scan's verdict gates the answer, not the enqueue, end to end over HTTP.

clamd scans the client's bytes while the request goes on to the engine with our pixels
(``webplatform.completions.validation.ScanVerdicts``). A fake clamd that answers late shows
the order: the engine works before the verdict, the client hears nothing before it, and a
refusal stops the request in the engine and is all the client gets, nothing charged.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.factories import PlanFactory, TenantFactory, api_key_for
from tests.webplatform.live_server import usage_records
from tests.webplatform.uploads import corpus

pytest_plugins = ["tests.webplatform.live_server"]

MODEL = "glm-4.6v-flash"
TOKENS_PER_DAY = 100_000
VERDICT_DELAY_S = 1.0
FOUND = "stream: Win.Test.EICAR_HDB-1 FOUND"
PARAM = "messages[0].content[1].image_url"


class _WatchedEngine:
    """The real engine, each step slowed to ``step_s``, recording when it stepped and what
    it was given."""

    def __init__(self, engine: Any, step_s: float) -> None:
        self._engine = engine
        self._step_s = step_s
        self.step_times: list[float] = []
        self.added: list[str] = []
        self.image_blobs: list[bytes] = []
        self.lock = threading.Lock()

    def add_request(self, request: Any, images: Any) -> None:
        with self.lock:
            self.added.append(request.request_id)
            self.image_blobs += list(images.values())
        self._engine.add_request(request, images)

    def step(self) -> Any:
        with self.lock:
            self.step_times.append(time.monotonic())
        time.sleep(self._step_s)
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


@pytest.fixture
def engine(monkeypatch) -> _WatchedEngine:  # type: ignore[no-untyped-def]
    """The in-process engine of the live server (built on its first request), watched."""
    from inference.client import inprocess

    real_load_engine = inprocess.load_engine
    holder: dict[str, _WatchedEngine] = {}

    def load(model: str, spec: Any) -> Any:
        holder["engine"] = _WatchedEngine(real_load_engine(model, spec), step_s=0.05)
        return holder["engine"]

    monkeypatch.setattr(inprocess, "load_engine", load)

    class _Lazy:
        def __getattr__(self, name: str) -> Any:
            return getattr(holder["engine"], name)

        def __setattr__(self, name: str, value: Any) -> None:
            setattr(holder["engine"], name, value)

    return _Lazy()  # type: ignore[return-value]


@pytest.fixture
def cancelled(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The request ids the live server's inference client was asked to cancel."""
    from inference.client.inprocess import InProcessClient

    ids: list[str] = []
    real_cancel = InProcessClient.cancel

    async def cancel(self: InProcessClient, request_id: str) -> None:
        ids.append(request_id)
        await real_cancel(self, request_id)

    monkeypatch.setattr(InProcessClient, "cancel", cancel)
    return ids


@pytest.fixture
def http(live_asgi_server, fake_clamd) -> httpx.Client:  # type: ignore[no-untyped-def]
    tenant = TenantFactory(plan=PlanFactory(tokens_per_day=TOKENS_PER_DAY, max_output_tokens=64))
    with live_asgi_server.client_for(tenant) as client:
        yield client


def _body(image: bytes, **extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "What does the label say?"},
        {"type": "image_url", "image_url": {"url": corpus.data_uri(image, "image/jpeg")}},
    ]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 64,
        "temperature": 0,
        **extra,
    }


def _warm_up(http: httpx.Client, fake_clamd: Any, engine: Any) -> int:
    """One answered request first: the engine loads on the first one (seconds), which
    would otherwise come after any verdict. Then the records start empty; returns the
    tokens left after it."""
    response = http.post("/v1/chat/completions", json=_body(corpus.noise_jpeg(60), max_tokens=2))
    assert response.status_code == 200, response.text
    fake_clamd.streams.clear()
    fake_clamd.replied_at.clear()
    with engine.lock:
        engine.step_times.clear()
        engine.added.clear()
        engine.image_blobs.clear()
    return _tokens_left(http)


def _tokens_left(http: httpx.Client) -> int:
    """The tenant's tokens left today, once nothing is in flight (nothing held)."""
    limits = http.get("/v1/usage").json()["rate_limits"]
    assert limits["concurrent_requests"]["in_flight"] == 0
    return int(limits["tokens"]["remaining"])


def test_the_engine_works_while_clamd_scans_and_the_answer_waits_for_the_verdict(
    http, fake_clamd, engine
) -> None:
    _warm_up(http, fake_clamd, engine)
    fake_clamd.delay_s = VERDICT_DELAY_S
    image = corpus.noise_jpeg(120)

    response = http.post("/v1/chat/completions", json=_body(image, max_tokens=4))
    answered_at = time.monotonic()

    assert response.status_code == 200, response.text
    assert fake_clamd.streams == [image]  # clamd had the client's own bytes
    (verdict_at,) = fake_clamd.replied_at
    assert engine.step_times[0] < verdict_at  # enqueued and stepped before the verdict
    assert answered_at > verdict_at
    # The engine had our pixels, never the client's bytes.
    assert [blob[:2] for blob in engine.image_blobs] == [b"P6"]
    assert image not in engine.image_blobs


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_image_stops_its_request_in_the_engine_and_only_the_refusal_is_sent(
    http, fake_clamd, engine, cancelled, stream
) -> None:
    tokens_left = _warm_up(http, fake_clamd, engine)
    fake_clamd.delay_s = VERDICT_DELAY_S
    fake_clamd.reply = FOUND
    image = corpus.noise_jpeg(120)

    response = http.post("/v1/chat/completions", json=_body(image, stream=stream))

    # A plain 400, also for a stream: nothing of the answer went out first.
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == {
        "message": "The image was rejected by the malware scanner.",
        "type": "invalid_request_error",
        "param": PARAM,
        "code": "malware_detected",
    }
    request_id = response.headers["x-request-id"]
    (verdict_at,) = fake_clamd.replied_at
    assert engine.added == [request_id]
    assert engine.step_times[0] < verdict_at
    # Stopped in the worker as soon as the refusal was read (its engine aborts it at its
    # next step): before the response, which waited for its first event.
    assert set(cancelled) == {request_id}
    assert _tokens_left(http) == tokens_left
    record = usage_records().get(request_id=request_id)
    assert (record.status, record.error_code) == ("error", "malware_detected")
    assert (record.prompt_tokens, record.completion_tokens) == (0, 0)

    # Nothing of it was kept for later: the same request with a clean verdict is computed.
    fake_clamd.reply, fake_clamd.delay_s = "stream: OK", 0.0
    again = http.post("/v1/chat/completions", json=_body(image, max_tokens=4))
    assert again.status_code == 200, again.text
    assert again.headers["x-cache"] == "miss"


def test_a_refused_image_is_the_error_when_no_worker_could_take_the_request(
    http, fake_clamd, redis_inference_without_workers
) -> None:
    fake_clamd.delay_s = 0.3
    fake_clamd.reply = FOUND

    response = http.post("/v1/chat/completions", json=_body(corpus.noise_jpeg(120)))

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malware_detected"
    assert _tokens_left(http) == TOKENS_PER_DAY


def test_a_client_gone_while_the_verdict_is_awaited_releases_everything(
    http, fake_clamd, engine, cancelled
) -> None:
    tokens_left = _warm_up(http, fake_clamd, engine)
    fake_clamd.delay_s = VERDICT_DELAY_S
    image = corpus.noise_jpeg(120)

    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json=_body(image), timeout=0.5)

    deadline = time.monotonic() + 5
    while not cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    (request_id,) = set(cancelled)  # by the client's disconnect (and the stream's close)
    assert engine.added == [request_id]
    # Settled after the cancel: the quota first, then the usage record.
    while not usage_records().filter(request_id=request_id).exists():
        assert time.monotonic() < deadline, "the request was never settled"
        time.sleep(0.01)
    record = usage_records().get(request_id=request_id)
    assert record.status == "cancelled"
    assert _tokens_left(http) == tokens_left


def test_a_scanner_found_unreachable_refuses_before_the_enqueue(
    http, fake_clamd, engine, settings, closed_port_url
) -> None:
    tokens_left = _warm_up(http, fake_clamd, engine)
    settings.CLAMD_URL = closed_port_url  # the outcome is known while validating

    response = http.post("/v1/chat/completions", json=_body(corpus.noise_jpeg(120)))

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "scanner_unavailable"
    assert engine.added == []  # nothing went to the engine
    assert _tokens_left(http) == tokens_left


async def test_a_refused_image_over_the_websocket_gets_an_error_frame_alone(
    live_asgi_server, fake_clamd
) -> None:
    import json

    from channels.db import database_sync_to_async
    from websockets.asyncio.client import connect

    from tests.webplatform.chat.support import FRAME_TIMEOUT_S, frames_until_end

    def make_key() -> str:
        tenant = TenantFactory(plan=PlanFactory(tokens_per_day=TOKENS_PER_DAY))
        return api_key_for(tenant).raw_key

    key = await database_sync_to_async(make_key)()
    fake_clamd.delay_s = 0.5
    fake_clamd.reply = FOUND
    async with connect(
        f"{live_asgi_server.ws_url}/ws/chat/",
        additional_headers={"Authorization": f"Bearer {key}"},
        proxy=None,
        open_timeout=FRAME_TIMEOUT_S,
    ) as ws:

        async def receive() -> dict[str, Any]:
            return json.loads(await ws.recv())

        assert (await receive())["type"] == "ready"
        content = _body(corpus.noise_jpeg(120))["messages"][0]["content"]
        await ws.send(json.dumps({"type": "message", "content": content, "max_tokens": 64}))
        frames = await frames_until_end(receive)

    assert [frame["type"] for frame in frames] == ["error"], frames
    assert frames[0]["code"] == "malware_detected"


def test_a_refusal_does_not_wait_for_the_engine_to_answer(
    http, fake_clamd, engine, cancelled
) -> None:
    tokens_left = _warm_up(http, fake_clamd, engine)
    engine._step_s = 1.5  # a step far longer than the verdict's delay
    fake_clamd.delay_s = 0.3
    fake_clamd.reply = FOUND
    started = time.monotonic()

    response = http.post("/v1/chat/completions", json=_body(corpus.noise_jpeg(120)))

    # Told at the refusal, not when the engine's step (and the cancelled request) ended.
    assert time.monotonic() - started < 1.2
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malware_detected"
    assert set(cancelled) == {response.headers["x-request-id"]}
    engine._step_s = 0.0
    assert _tokens_left(http) == tokens_left


def test_a_broker_outage_at_the_enqueue_gives_way_to_a_refusal(
    http, fake_clamd, monkeypatch
) -> None:
    import redis

    from inference.client.inprocess import InProcessClient

    async def submit(self: Any, request: Any, **_: Any) -> Any:
        raise redis.ConnectionError("Connection refused")
        yield  # an async generator, as the real one

    monkeypatch.setattr(InProcessClient, "submit", submit)
    fake_clamd.delay_s = 0.3
    fake_clamd.reply = FOUND

    response = http.post("/v1/chat/completions", json=_body(corpus.noise_jpeg(120)))

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malware_detected"
    record = usage_records().get(request_id=response.headers["x-request-id"])
    assert (record.status, record.error_code) == ("error", "malware_detected")
    fake_clamd.reply = "stream: OK"
    clean = http.post("/v1/chat/completions", json=_body(corpus.noise_jpeg(121)))
    assert clean.status_code == 503, clean.text  # without a refusal the outage is the error
    assert clean.json()["error"]["code"] == "service_unavailable"
