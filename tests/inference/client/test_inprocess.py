"""The in-process client (embedded mode): the worker loop in a thread of this process.

No Redis and no database. The fake-engine tests pin exact behaviour (cancel frees the slot,
leaving early cancels, model health before/after loading); the last tests go through
``get_inference_client()`` with ``INFERENCE_TRANSPORT=inprocess`` and the real tiny model.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from inference.client import get_inference_client, reset_inference_client
from inference.client.inprocess import InProcessClient
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    ImageRef,
    StartEvent,
)
from inference.settings import InferenceSettings
from tests.inference.fakes import FakeEngine, fake_answer, make_request

MODEL = "fake"


@pytest.fixture
def engines() -> list[FakeEngine]:
    return []


@pytest.fixture
async def client(engines):
    def factory(model, spec):
        engine = FakeEngine(max_batch_size=2, step_delay_s=0.005)
        engines.append(engine)
        return engine

    settings = InferenceSettings(models={MODEL: {}}, heartbeat_s=0.05, request_timeout_s=10)
    c = InProcessClient(settings=settings, engine_factory=factory)
    yield c
    await c.aclose()


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, DeltaEvent))


async def test_submit_streams_the_answer(client):
    request = make_request("hi there", max_tokens=6)
    events = [e async for e in client.submit(request)]
    assert isinstance(events[0], StartEvent)
    assert text_of(events) == fake_answer(request)
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == FinishReason.LENGTH


async def test_concurrent_requests_share_one_engine(client, engines):
    requests = [make_request(f"q{i}", max_tokens=3 + i, stream=i % 2 == 0) for i in range(6)]

    async def ask(request):
        return [e async for e in client.submit(request)]

    results = await asyncio.wait_for(asyncio.gather(*(ask(q) for q in requests)), 10)
    assert [text_of(events) for events in results] == [fake_answer(q) for q in requests]
    assert len(engines) == 1  # loaded once, lazily


async def test_cancel_frees_the_slot(client, engines):
    request = make_request("long", max_tokens=10_000)
    agen = client.submit(request)
    assert isinstance(await agen.__anext__(), StartEvent)
    assert engines[0].stats().running == 1
    await client.cancel(request.request_id)
    rest = [e async for e in agen]
    assert rest[-1].finish_reason == FinishReason.CANCELLED
    assert engines[0].stats().running == 0


async def test_leaving_the_stream_early_cancels(client, engines):
    request = make_request("long", max_tokens=10_000)
    agen = client.submit(request)
    await agen.__anext__()
    await agen.aclose()
    for _ in range(200):
        if engines[0].stats().running == 0:
            break
        await asyncio.sleep(0.01)
    assert engines[0].stats().running == 0


async def test_images_are_fetched_per_tenant(client):
    data = b"png bytes"
    ref = ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=2, height=2)
    await client.put_image(tenant_id="tenant-a", data=data, ref=ref)
    ok = [e async for e in client.submit(make_request("look", image_refs=[ref]))]
    assert isinstance(ok[-1], DoneEvent)
    other = make_request("look", tenant_id="tenant-b", image_refs=[ref])
    refused = [e async for e in client.submit(other)]
    assert refused[-1].code == ErrorCode.IMAGE_UNAVAILABLE


async def test_timeout_is_an_error_event_and_cancels(client, engines):
    request = make_request("long", max_tokens=10_000)
    events = [e async for e in client.submit(request, time_limit_s=0.3)]
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == ErrorCode.TIMEOUT
    assert client.hub.cancelled([request.request_id]) == {request.request_id}


async def test_model_health_before_and_after_loading(client):
    before = await client.model_health(MODEL)
    assert before.live_workers == 1 and before.capacity > 0  # servable: loads on demand
    assert before.detail == "loads on first request"
    [e async for e in client.submit(make_request("warm up"))]
    for _ in range(100):
        after = await client.model_health(MODEL)
        if after.workers:
            break
        await asyncio.sleep(0.02)
    assert after.live_workers == 1 and after.capacity == 2 and after.queue_depth == 0
    unknown = await client.model_health("nope")
    assert unknown.live_workers == 0


async def test_a_model_that_fails_to_load_answers_with_errors(caplog):
    def broken(model, spec):
        raise OSError("no weights here")

    settings = InferenceSettings(models={MODEL: {}}, request_timeout_s=5)
    c = InProcessClient(settings=settings, engine_factory=broken)
    try:
        events = [e async for e in c.submit(make_request())]
        assert [type(e) for e in events] == [ErrorEvent]
        assert events[0] == ErrorEvent.fixed(ErrorCode.INTERNAL_ERROR)
        assert "no weights here" not in events[0].message
        assert "no weights here" in caplog.text  # for the operator, in the log
        assert (await c.model_health(MODEL)).live_workers == 0
    finally:
        await c.aclose()


# --- through get_inference_client() with the real tiny model ----------------------------


@pytest.fixture
def inprocess_tiny(settings, tiny_model_dir):
    settings.INFERENCE_TRANSPORT = "inprocess"
    settings.INFERENCE_MODELS = {
        "tiny": {"path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}
    }
    reset_inference_client()
    yield get_inference_client()
    reset_inference_client()


@pytest.mark.slow
async def test_get_inference_client_serves_the_tiny_model_in_process(inprocess_tiny):
    client = inprocess_tiny
    assert isinstance(client, InProcessClient)
    assert client is get_inference_client()  # one per process
    request = make_request("hello world", model="tiny", max_tokens=64)
    events = [e async for e in client.submit(request)]
    assert isinstance(events[0], StartEvent), events
    assert isinstance(events[-1], DoneEvent), events
    assert text_of(events)  # the tiny model says something
    assert (await client.model_health("tiny")).live_workers == 1
    # Cancel mid-answer: the next step frees the slot and reports CANCELLED.
    request = make_request("hello world", model="tiny", max_tokens=64)
    agen = client.submit(request)
    first = await agen.__anext__()
    assert isinstance(first, StartEvent)
    await client.cancel(request.request_id)
    rest = [e async for e in agen]
    assert rest[-1] == DoneEvent(finish_reason=FinishReason.CANCELLED, usage=rest[-1].usage)
