"""A model served by another OpenAI-compatible server (vLLM, SGLang, TGI, or another
instance of this platform), behind the same ``InferenceClient`` interface as the workers.

An ``INFERENCE_MODELS`` entry of kind ``openai-upstream``::

    "glm-4.6v": {"kind": "openai-upstream", "base_url": "http://vllm:8000/v1",
                 "api_key_file": "/run/secrets/vllm_key", "model": "zai-org/GLM-4.6V",
                 "timeout_s": 120, "max_concurrency": 32}

What this client does for such a model (``UpstreamClient``):

- ``submit`` sends ``POST {base_url}/chat/completions`` with ``stream: true`` (always: the
  first token tells a retry apart from a broken answer, and a client that goes away closes
  the upstream stream) and turns the SSE chunks into the protocol's events: ``StartEvent``
  at the first chunk, one ``DeltaEvent`` per chunk with text, then ``DoneEvent`` with the
  upstream's usage (``stream_options.include_usage``) and, when the upstream sent
  log-probabilities, their mean (``DoneEvent.mean_logprob``).
- Images go as data URIs of the bytes this platform validated and re-encoded
  (``put_image`` holds them, per tenant and content hash, until the request that put them
  has built its body, or ``_IMAGE_MAX_AGE_S`` passed: a request abandoned before it ran).
  An image of an earlier conversation turn is not held: such a request gets
  ``image_unavailable``.
- Connection failures, 429 and 5xx answers and a stream that breaks before its first token
  are retried with exponential backoff (``max_retries``, ``retry_backoff_s``) within the
  request's deadline; after the first token nothing is retried (the client has text).
- ``timeout_s`` bounds the whole request and each wait for a chunk; ``connect_timeout_s``
  the connection.
- ``max_concurrency`` requests at a time; more wait (the wait is ``model_health``'s queue,
  so the degradation step refuses or falls back when it grows too long).
- A circuit breaker: ``breaker_failures`` upstream failures in a row open it for
  ``breaker_reset_s`` seconds; while open ``model_health`` reports no live worker, so
  ``webplatform.completions.routing`` answers 503 with ``retry-after`` or the plan's
  fallback, and then one trial request is let through (half-open).
- The upstream's key is read from ``api_key_file`` (or ``api_key``) and only ever travels
  in the ``Authorization`` header: no log line, error message or ``repr`` holds it. The
  upstream's own error text never reaches a client either: errors follow the fixed-message
  policy of ``inference.protocol``.

``ModelDispatchClient`` puts upstream models beside the process's worker transport: requests
for an upstream model go to its ``UpstreamClient``, every other one to the transport.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import random
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from inference.client.base import InferenceClient, ModelHealth
from inference.client.blobs import blob_check_digest
from inference.client.circuit_breaker import CircuitBreaker
from inference.client.held_images import HeldImages
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    ImagePart,
    ImageRef,
    InferenceRequest,
    StartEvent,
    Usage,
)
from inference.settings import InferenceSettings

logger = logging.getLogger(__name__)

UPSTREAM_KIND = "openai-upstream"


def is_upstream_spec(spec: Mapping[str, Any]) -> bool:
    return spec.get("kind") == UPSTREAM_KIND


@dataclass(frozen=True)
class UpstreamSpec:
    """An ``openai-upstream`` entry of ``INFERENCE_MODELS``, checked."""

    name: str  # the served name (the key of INFERENCE_MODELS)
    base_url: str  # up to and including /v1
    model: str  # the upstream's own name of the model
    api_key: str = field(default="", repr=False)
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    max_concurrency: int = 16
    max_retries: int = 2
    retry_backoff_s: float = 0.25
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    logprobs: bool = True  # ask for token log-probabilities (escalation reads their mean)
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, name: str, spec: Mapping[str, Any]) -> UpstreamSpec:
        if not is_upstream_spec(spec):
            raise ValueError(f"model {name!r} is not of kind {UPSTREAM_KIND!r}")
        base_url = str(spec.get("base_url") or "").rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"model {name!r}: base_url must be an http(s) URL")
        key = str(spec.get("api_key") or "")
        key_file = spec.get("api_key_file")
        if key_file:
            key = Path(str(key_file)).read_text().strip()
        return cls(
            name=name,
            base_url=base_url,
            model=str(spec.get("model") or name),
            api_key=key,
            timeout_s=float(spec.get("timeout_s", cls.timeout_s)),
            connect_timeout_s=float(spec.get("connect_timeout_s", cls.connect_timeout_s)),
            max_concurrency=max(1, int(spec.get("max_concurrency", cls.max_concurrency))),
            max_retries=max(0, int(spec.get("max_retries", cls.max_retries))),
            retry_backoff_s=float(spec.get("retry_backoff_s", cls.retry_backoff_s)),
            breaker_failures=max(1, int(spec.get("breaker_failures", cls.breaker_failures))),
            breaker_reset_s=float(spec.get("breaker_reset_s", cls.breaker_reset_s)),
            logprobs=bool(spec.get("logprobs", True)),
            extra_body=dict(spec.get("extra_body") or {}),
        )


class _UpstreamFailure(Exception):
    """The upstream failed in a way a retry (before the first token) may cure."""

    def __init__(self, reason: str, *, code: ErrorCode = ErrorCode.INTERNAL_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _UpstreamRefusal(Exception):
    """The upstream refused the request itself (4xx): no retry, no breaker failure."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.code.value)
        self.event = event


_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}

# A held image no request took (its request was abandoned before it ran) is dropped then.
_IMAGE_MAX_AGE_S = 120.0


@dataclass
class _LoopState:
    http: httpx.AsyncClient
    slots: asyncio.Semaphore
    waiting: int = 0
    running: int = 0


class UpstreamClient(InferenceClient):
    """``InferenceClient`` for one ``openai-upstream`` model. Safe to share across loops."""

    def __init__(
        self,
        *,
        settings: InferenceSettings,
        spec: UpstreamSpec,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.breaker = CircuitBreaker(failures=spec.breaker_failures, reset_s=spec.breaker_reset_s)
        self.images = HeldImages(max_age_s=_IMAGE_MAX_AGE_S)
        self._transport = transport
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._running: set[str] = set()  # request ids submitted here and not finished
        self._cancelled: set[str] = set()

    def __repr__(self) -> str:
        return f"UpstreamClient({self.spec.name!r} -> {self.spec.base_url} {self.spec.model!r})"

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            # No "accept: text/event-stream": some servers (this platform's DRF views among
            # them) negotiate on it and refuse; the stream is asked for in the body.
            headers: dict[str, str] = {}
            if self.spec.api_key:
                headers["authorization"] = f"Bearer {self.spec.api_key}"
            http = httpx.AsyncClient(
                headers=headers,
                transport=self._transport,
                limits=httpx.Limits(max_connections=self.spec.max_concurrency),
                follow_redirects=False,
            )
            state = _LoopState(http=http, slots=asyncio.Semaphore(self.spec.max_concurrency))
            self._loops[loop] = state
        return state

    async def put_image(self, *, tenant_id: str, data: bytes, ref: ImageRef) -> None:
        blob_check_digest(data=data, ref=ref)
        self.images.put(tenant_id=tenant_id, sha256=ref.sha256, data=data)

    def _body(self, request: InferenceRequest) -> dict[str, Any] | ErrorEvent:
        refs = request.image_refs()
        blobs = self.images.take(tenant_id=request.tenant_id, sha256s=[r.sha256 for r in refs])
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            parts: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, ImagePart):
                    data = blobs.get(part.image.sha256)
                    if data is None:
                        return ErrorEvent.fixed(ErrorCode.IMAGE_UNAVAILABLE)
                    uri = _data_uri(data, part.image.media_type)
                    parts.append({"type": "image_url", "image_url": {"url": uri}})
                else:
                    parts.append({"type": "text", "text": part.text})
            if all(p["type"] == "text" for p in parts):
                messages.append(
                    {"role": message.role, "content": "".join(p["text"] for p in parts)}
                )
            else:
                messages.append({"role": message.role, "content": parts})
        sampling = request.sampling
        body: dict[str, Any] = {
            **self.spec.extra_body,
            "model": self.spec.model,
            "messages": messages,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.spec.logprobs:
            body["logprobs"] = True
        return body

    async def submit(
        self, request: InferenceRequest, *, time_limit_s: float | None = None
    ) -> AsyncIterator[Event]:
        if request.model != self.spec.name:
            yield ErrorEvent(ErrorCode.MODEL_NOT_FOUND, f"Unknown model '{request.model}'.")
            return
        # Re-encoding and base64 of images take CPU: off the event loop when there are any.
        if request.image_refs():
            body = await asyncio.to_thread(self._body, request)
        else:
            body = self._body(request)
        if isinstance(body, ErrorEvent):
            yield body
            return
        loop = asyncio.get_running_loop()
        limit_s = min(time_limit_s or self.settings.request_timeout_s, self.spec.timeout_s)
        deadline = loop.time() + limit_s
        state = self._state()
        self._running.add(request.request_id)
        state.waiting += 1
        try:
            async with asyncio.timeout(limit_s):
                await state.slots.acquire()
        except TimeoutError:
            self._running.discard(request.request_id)
            yield ErrorEvent(ErrorCode.TIMEOUT, f"No answer within {limit_s:g} seconds.", True)
            return
        except BaseException:
            self._running.discard(request.request_id)
            raise
        finally:
            state.waiting -= 1
        state.running += 1
        try:
            async for event in self._attempts(request, body, state, deadline, limit_s):
                yield event
        finally:
            state.running -= 1
            state.slots.release()
            self._running.discard(request.request_id)
            self._cancelled.discard(request.request_id)

    async def _attempts(
        self,
        request: InferenceRequest,
        body: dict[str, Any],
        state: _LoopState,
        deadline: float,
        limit_s: float,
    ) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            if not self.breaker.allow():
                yield ErrorEvent.fixed(ErrorCode.INTERNAL_ERROR, retryable=True)
                return
            started = [False]
            try:
                async for event in self._one_attempt(request, body, state, deadline, started):
                    yield event
                self.breaker.success()
                return
            except (GeneratorExit, asyncio.CancelledError):
                # The caller went away (the generator closed, or its task cancelled): no
                # verdict on the upstream, so a half-open trial lets the next one try.
                self.breaker.release()
                raise
            except _UpstreamRefusal as refusal:
                self.breaker.success()  # the upstream is up; the request was at fault
                yield refusal.event
                return
            except _UpstreamFailure as failure:
                self.breaker.failure()
                logger.warning(
                    "upstream %s failed for %s (attempt %d): %s",
                    self.spec.name,
                    request.request_id,
                    attempt + 1,
                    failure.reason,
                )
                if started[0]:
                    # Text already went to the client: never retried, never repeated.
                    code = (
                        ErrorCode.TIMEOUT
                        if failure.code is ErrorCode.TIMEOUT
                        else ErrorCode.WORKER_LOST
                    )
                    yield ErrorEvent.fixed(code)
                    return
                remaining = deadline - loop.time()
                backoff = self.spec.retry_backoff_s * (2**attempt) * (0.5 + random.random())
                if (
                    failure.code is ErrorCode.TIMEOUT
                    or attempt >= self.spec.max_retries
                    or remaining <= backoff
                ):
                    if failure.code is ErrorCode.TIMEOUT:
                        message = f"No answer within {limit_s:g} seconds."
                        yield ErrorEvent(ErrorCode.TIMEOUT, message, retryable=True)
                    else:
                        yield ErrorEvent.fixed(ErrorCode.INTERNAL_ERROR, retryable=True)
                    return
                attempt += 1
                await asyncio.sleep(backoff)

    async def _one_attempt(
        self,
        request: InferenceRequest,
        body: dict[str, Any],
        state: _LoopState,
        deadline: float,
        started: list[bool],
    ) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _UpstreamFailure("deadline passed", code=ErrorCode.TIMEOUT)
        timeout = httpx.Timeout(
            min(remaining, self.spec.timeout_s), connect=min(remaining, self.spec.connect_timeout_s)
        )
        url = f"{self.spec.base_url}/chat/completions"
        headers = {"x-request-id": request.request_id}
        try:
            async with asyncio.timeout_at(deadline):
                async with state.http.stream(
                    "POST", url, json=body, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise _status_error(response.status_code)
                    async for event in self._read_stream(request, response, started):
                        yield event
        except TimeoutError as exc:
            raise _UpstreamFailure("no answer in time", code=ErrorCode.TIMEOUT) from exc
        except httpx.TimeoutException as exc:
            raise _UpstreamFailure(type(exc).__name__, code=ErrorCode.TIMEOUT) from exc
        except httpx.HTTPError as exc:
            # The exception's class only: its text may hold the URL.
            raise _UpstreamFailure(type(exc).__name__) from exc

    async def _read_stream(
        self, request: InferenceRequest, response: httpx.Response, started: list[bool]
    ) -> AsyncIterator[Event]:
        usage: dict[str, Any] | None = None
        finish: str | None = None
        logprobs: list[float] = []
        tokens = 0
        done = False
        async for line in response.aiter_lines():
            if request.request_id in self._cancelled:
                yield DoneEvent(FinishReason.CANCELLED, Usage(completion_tokens=tokens))
                return
            if not line or line.startswith(":"):
                continue
            if not line.startswith("data:"):
                if line.startswith(("event:", "id:", "retry:")):
                    continue
                raise _UpstreamFailure("malformed SSE line")
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise _UpstreamFailure("malformed SSE data") from exc
            if not isinstance(chunk, dict):
                raise _UpstreamFailure("malformed chunk")
            if "error" in chunk:
                raise _UpstreamFailure("error event in the stream")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            choices = chunk.get("choices")
            if not isinstance(choices, list):
                raise _UpstreamFailure("chunk without choices")
            for choice in choices[:1]:
                if not isinstance(choice, dict):
                    raise _UpstreamFailure("malformed choice")
                delta = choice.get("delta") or {}
                if not isinstance(delta, dict):
                    raise _UpstreamFailure("malformed delta")
                text = delta.get("content") or ""
                reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                if not isinstance(text, str) or not isinstance(reasoning, str):
                    raise _UpstreamFailure("malformed delta")
                lp = choice.get("logprobs")
                if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                    logprobs.extend(
                        float(t["logprob"])
                        for t in lp["content"]
                        if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)
                    )
                if text or reasoning:
                    if not started[0]:
                        started[0] = True
                        yield StartEvent(prompt_tokens=0)
                    tokens += 1
                    yield DeltaEvent(text=text, reasoning=reasoning, tokens=1)
                if choice.get("finish_reason"):
                    finish = str(choice["finish_reason"])
        if not done and finish is None:
            raise _UpstreamFailure("stream ended without finishing")
        if not started[0]:
            yield StartEvent(prompt_tokens=_int(usage, "prompt_tokens"))
            started[0] = True
        yield DoneEvent(
            finish_reason=_FINISH.get(finish or "stop", FinishReason.STOP),
            usage=Usage(
                prompt_tokens=_int(usage, "prompt_tokens"),
                completion_tokens=_int(usage, "completion_tokens") if usage else tokens,
            ),
            mean_logprob=math.fsum(logprobs) / len(logprobs) if logprobs else None,
        )

    async def cancel(self, request_id: str) -> None:
        # The stream's reader sees it at its next chunk; a consumer that stops iterating
        # closes the upstream connection at once. Requests not running here are not ours
        # (the dispatch client asks every client).
        if request_id in self._running:
            self._cancelled.add(request_id)

    async def model_health(self, model: str) -> ModelHealth:
        if model != self.spec.name:
            return ModelHealth(model, 0, 0, 0, 0, 0, detail="unknown model")
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        waiting = state.waiting if state else 0
        running = state.running if state else 0
        breaker = self.breaker.state
        live = 0 if breaker == "open" else 1
        detail = f"upstream {self.spec.base_url}, circuit {breaker}"
        return ModelHealth(
            model=model,
            live_workers=live,
            waiting=waiting,
            pending=running,
            running=running,
            capacity=self.spec.max_concurrency,
            detail=detail,
        )

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        state = self._loops.pop(loop, None)
        if state is not None:
            await state.http.aclose()


# Formats every OpenAI-compatible server reads; the platform's validated bytes are a raw
# pixmap (no compression to decode again), which is sent as PNG instead.
_UPSTREAM_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})


def _data_uri(data: bytes, media_type: str) -> str:
    if media_type not in _UPSTREAM_MEDIA_TYPES:
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.save(buffer, "PNG", compress_level=1)
        data, media_type = buffer.getvalue(), "image/png"
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _int(usage: Mapping[str, Any] | None, name: str) -> int:
    value = (usage or {}).get(name)
    return int(value) if isinstance(value, int) and value >= 0 else 0


def _status_error(status: int) -> Exception:
    """What an upstream answer other than 200 means; its body is never passed on."""
    if status == 429 or status >= 500:
        return _UpstreamFailure(f"HTTP {status}")
    if status in (400, 422):
        return _UpstreamRefusal(ErrorEvent.fixed(ErrorCode.INVALID_REQUEST))
    if status == 413:
        return _UpstreamRefusal(ErrorEvent.fixed(ErrorCode.CONTEXT_LENGTH_EXCEEDED))
    # 401/403 (our key), 404 (our model name), redirects: our configuration is wrong.
    return _UpstreamFailure(f"HTTP {status}")
