"""The parts of the openai-upstream client that need no server: its spec, its circuit
breaker, the factory's dispatch, and what the request body holds (images as data URIs)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io

import pytest
from PIL import Image

from inference.client.circuit_breaker import CircuitBreaker
from inference.client.dispatch import ModelDispatchClient
from inference.client.factory import build_inference_client
from inference.client.inprocess import InProcessClient
from inference.client.upstream import UpstreamClient, UpstreamSpec
from inference.protocol import (
    ErrorCode,
    ErrorEvent,
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    TextPart,
)
from inference.settings import InferenceSettings


def test_the_spec_reads_the_key_from_its_file_and_never_shows_it(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-very-secret\n")
    spec = UpstreamSpec.from_spec(
        "big",
        {"kind": "openai-upstream", "base_url": "http://h:8000/v1/", "api_key_file": str(key_file)},
    )
    assert spec.api_key == "sk-very-secret"
    assert spec.base_url == "http://h:8000/v1"
    assert spec.model == "big"
    client = UpstreamClient(settings=InferenceSettings(), spec=spec)
    assert "secret" not in repr(spec) and "secret" not in repr(client)
    with pytest.raises(ValueError, match="base_url"):
        UpstreamSpec.from_spec("x", {"kind": "openai-upstream", "base_url": "file:///etc"})


def test_the_breaker_opens_after_failures_and_lets_one_trial_through():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.0
    assert breaker.state == "half-open"
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one at a time
    breaker.failure()  # the trial failed: open again, for another reset_s
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.release()  # its client went away: no verdict, the next may try
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0


def test_the_factory_serves_upstream_models_beside_the_transport():
    models = {
        "glm-4.6v-flash": {"path": "/nowhere"},
        "big": {"kind": "openai-upstream", "base_url": "http://127.0.0.1:9/v1"},
    }
    client = build_inference_client(InferenceSettings(transport="inprocess", models=models))
    assert isinstance(client, ModelDispatchClient)
    assert isinstance(client.client_for("big"), UpstreamClient)
    assert isinstance(client.client_for("glm-4.6v-flash"), InProcessClient)
    # The worker transport never sees the upstream model (it would try to load it).
    assert list(client.default.settings.models) == ["glm-4.6v-flash"]
    plain = build_inference_client(InferenceSettings(transport="inprocess", models={"a": {}}))
    assert isinstance(plain, InProcessClient)


def _pixmap() -> tuple[bytes, ImageRef]:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(buffer, "PPM")
    data = buffer.getvalue()
    ref = ImageRef(hashlib.sha256(data).hexdigest(), 4, 3, "image/x-portable-pixmap")
    return data, ref


def test_the_body_carries_validated_images_as_png_data_uris():
    spec = UpstreamSpec(name="big", base_url="http://h/v1", model="GLM-4.6V", logprobs=True)
    client = UpstreamClient(settings=InferenceSettings(), spec=spec)
    data, ref = _pixmap()
    asyncio.run(client.put_image(tenant_id="7", data=data, ref=ref))
    content = [TextPart("What colour?"), ImagePart(ref)]
    # Another tenant's request cannot use that image.
    other = InferenceRequest("r2", "8", "big", [Message("user", content)])
    assert client._body(other) == ErrorEvent.fixed(ErrorCode.IMAGE_UNAVAILABLE)
    request = InferenceRequest("r1", "7", "big", [Message("user", content)])
    body = client._body(request)
    assert isinstance(body, dict)
    assert body["model"] == "GLM-4.6V" and body["stream"] is True and body["logprobs"] is True
    parts = body["messages"][0]["content"]
    uri = parts[1]["image_url"]["url"]
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.size == (4, 3) and image.getpixel((0, 0)) == (10, 20, 30)
    # The request took its hold: nothing stays in memory.
    assert len(client.images) == 0


async def test_a_trial_whose_caller_is_cancelled_lets_the_next_one_try():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        spec = UpstreamSpec.from_spec(
            "big",
            {
                "kind": "openai-upstream",
                "base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
                "api_key": "secret",
                "breaker_failures": 1,
                "breaker_reset_s": 0,
                "max_retries": 0,
            },
        )
        client = UpstreamClient(settings=InferenceSettings(), spec=spec)
        client.breaker.failure()  # open; with no reset time, half-open at once
        assert client.breaker.state == "half-open"
        request = InferenceRequest(
            request_id="req_trial",
            tenant_id="t",
            model="big",
            messages=[Message(role="user", content=[TextPart(text="hi")])],
        )
        events = client.submit(request)
        trial = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)  # the trial is waiting for the upstream's answer
        assert not client.breaker.allow()  # only one trial at a time

        trial.cancel()  # its client went away (a disconnect cancels the handler's task)
        with pytest.raises(asyncio.CancelledError):
            await trial

        assert client.breaker.allow()  # no verdict: the next request may try
        await client.aclose()
