"""``POST /v1/chat/completions``: OpenAI-compatible, plain JSON or Server-Sent Events.

The view parses the body with the one request schema
(``webplatform.completions.serializers``), hands it to the request path
(``webplatform.completions.pipeline``) and renders the answer with ``openai_wire``. An async
view (adrf): a completion may take seconds, and a sync view under ASGI would hold a thread
for all of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

from adrf.views import APIView as AsyncAPIView
from asgiref.sync import async_to_sync
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.request import Request

from tenants.errors import ApplicationError
from webplatform.after_response import after_response_deferral
from webplatform.api import openai_wire
from webplatform.api.base import AuthenticatedApiView, principal_of
from webplatform.api.body_cap import principal_body_cap
from webplatform.api.request_body import json_body_read
from webplatform.api.schema import error_responses
from webplatform.completions.answer import Answer, AnswerEvent, NoticeEvent
from webplatform.completions.pipeline import chat_completion_start
from webplatform.completions.request import Caller, ChatCompletionInput, EntryPoint
from webplatform.completions.request_errors import chat_request_error
from webplatform.completions.serializers import ChatCompletionRequestSerializer
from webplatform.completions.streaming import CompletionRun
from webplatform.middleware import request_id_of

logger = logging.getLogger(__name__)

# Told in-band when a stream fails on our side after its headers were sent.
STREAM_ERROR = ApplicationError(
    "The server had an error while processing your request. Sorry about that!",
    code="internal_error",
    status=500,
    type="server_error",
)


def _request_body(request: Request, *, limit: int) -> Any:
    """The JSON body, read with the caller's own size limit (413 ``request_too_large``),
    parsed strictly (``webplatform.api.request_body``). ``BodyLimits`` has applied the same
    limit while the body streamed in (``webplatform.api.body_cap``); checked again here for
    a caller it could not look up then."""
    media_type = request.content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise exceptions.UnsupportedMediaType(media_type or "(none)")
    return json_body_read(request._request, limit=limit, max_depth=settings.REQUEST_JSON_MAX_DEPTH)


def _no_store(cache_control: str) -> bool:
    """Whether a ``Cache-Control`` request header asks not to use the answer cache."""
    directives = {d.strip().split("=", 1)[0].lower() for d in cache_control.split(",")}
    return bool(directives & {"no-store", "no-cache"})


def _parse_input(request: Request) -> ChatCompletionInput:
    principal = principal_of(request)
    serializer = ChatCompletionRequestSerializer(
        data=_request_body(request, limit=principal_body_cap(principal))
    )
    if not serializer.is_valid():
        raise chat_request_error(serializer.errors)
    return serializer.to_input(
        default_model=principal.default_model or "",
        use_cache=not _no_store(request.headers.get("cache-control", "")),
    )


def _response_headers(run: CompletionRun) -> dict[str, str]:
    headers = {
        "x-cache": "hit" if run.cache_hit else "miss",
        **run.rate_limit_headers,
    }
    if run.fallback:
        headers["x-model-fallback"] = f"{run.requested_model} -> {run.model}"
    if run.route_rule:  # model "auto": what answered, and the rule that decided
        headers["x-routed-model"] = run.model
        headers["x-routed-rule"] = run.route_rule
    return headers


async def _sse_stream(
    run: CompletionRun, events: AsyncGenerator[AnswerEvent, None], first: AnswerEvent
) -> AsyncIterator[bytes]:
    """The SSE body: ``first``, the event the view awaited before sending headers, then the
    rest of ``events``."""
    chunks = openai_wire.ChunkStream(
        request_id=run.request_id,
        model=run.model,
        created=run.created,
        include_usage=run.input.include_usage,
    )

    def rendered(event: AnswerEvent) -> Iterator[bytes]:
        if isinstance(event, NoticeEvent):
            yield openai_wire.sse_comment(event.message)
        elif isinstance(event, Answer):
            yield openai_wire.sse(chunks.last(event))
            if chunks.include_usage:
                yield openai_wire.sse(chunks.usage(event))
        elif (chunk := chunks.delta(event)) is not None:
            yield openai_wire.sse(chunk)

    yield openai_wire.sse(chunks.first())
    try:
        for data in rendered(first):
            yield data
        async for event in events:
            for data in rendered(event):
                yield data
    except ApplicationError as exc:
        # Headers are gone; OpenAI reports a mid-stream failure as an error event.
        yield openai_wire.sse(openai_wire.error_object(exc))
    except asyncio.CancelledError:
        logger.info("client went away during %s; cancelled", run.request_id)
        raise
    except Exception:
        # Not ours to swallow silently, but the client must not see a torn stream either.
        logger.exception("streaming %s failed", run.request_id)
        yield openai_wire.sse(openai_wire.error_object(STREAM_ERROR))
    finally:
        await events.aclose()
        await run.abandon()  # a no-op when events() settled, as it does unless never started
    yield openai_wire.SSE_DONE


class CompletionStreamResponse(StreamingHttpResponse):
    """The SSE response of one run. Django closes every response it handled, also when the
    client went away before the body started (then ``_sse_stream`` never ran and could not
    settle): closing settles the run in that case, so its admission is never leaked."""

    def __init__(
        self, run: CompletionRun, events: AsyncGenerator[AnswerEvent, None], first: AnswerEvent
    ) -> None:
        super().__init__(_sse_stream(run, events, first), content_type="text/event-stream")
        self.run = run
        self.events = events

    async def _close_events(self) -> None:
        await self.events.aclose()

    def close(self) -> None:
        super().close()
        try:
            # Never started: the stream waits after its first event; closing it cancels
            # the request in the worker and settles it. A no-op once the body closed it.
            async_to_sync(self._close_events)()
        except RuntimeError:  # still running in the body's task, which closes it itself
            pass
        async_to_sync(self.run.abandon)()


class ChatCompletionsApi(AuthenticatedApiView, AsyncAPIView):
    # Every response carries the x-request-id the middleware gives the HTTP request; when
    # the request was admitted, it is also the id of its usage record.

    parsed_input: ChatCompletionInput | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # adrf runs this (authentication, permissions, throttles) in one hand-off to the
        # request's own thread (webplatform.request_threads); the body is parsed there too,
        # once they passed: off the event loop, as a body of several MB of base64 takes
        # tens of ms of CPU, without a thread hand-off of its own.
        super().initial(request, *args, **kwargs)
        if request.method == "POST":
            self.parsed_input = _parse_input(request)

    @extend_schema(
        operation_id="createChatCompletion",
        request=ChatCompletionRequestSerializer,
        responses={
            (200, "application/json"): OpenApiResponse(
                response=openai_wire.ChatCompletion,
                description="A `chat.completion`; with `stream: true`, Server-Sent Events "
                "(`text/event-stream`): `data: ` and a `chat.completion.chunk` each, ending "
                "with `data: [DONE]`. An error known before the first token is a plain "
                "error response, as without `stream`; one after the stream started is "
                "sent as one more event, an error object.",
            ),
            (200, "text/event-stream"): openai_wire.ChatCompletionChunk,
            **error_responses(400, 401, 403, 404, 413, 415, 429, 503),
        },
        summary="Create a chat completion (OpenAI-compatible; images as data URIs)",
        description="Answers the last user message of `messages` (or the simple form's "
        "`prompt`), with the images it carries. Every response has an `x-request-id` "
        "header and the `x-ratelimit-*` headers; `x-cache` says whether the answer came "
        "from the answer cache, and `x-model-fallback` names the model that answered "
        "when the plan's fallback did.",
    )
    async def post(self, request: Request) -> HttpResponse | StreamingHttpResponse:
        inp = self.parsed_input
        assert inp is not None  # parsed by initial, which ran first
        run = await chat_completion_start(
            caller=Caller(principal=principal_of(request), entry_point=EntryPoint.REST),
            inp=inp,
            request_id=request_id_of(request),
        )
        # The usage record and content log after the last byte, where the ASGI stack can
        # (webplatform.after_response); the quota is still settled before it.
        run.settlement.defer_records = after_response_deferral(request._request)
        headers = _response_headers(run)
        if inp.stream:
            # Headers wait for the first event: an error known before the first token
            # (context_length_exceeded, an image the model cannot read, no worker) is a
            # plain 4xx/5xx, as without stream, not a 200 with an in-band error.
            events = run.events()
            try:
                first = await anext(events)
            except StopAsyncIteration:  # events() always ends with an Answer or raises
                raise STREAM_ERROR from None
            response = CompletionStreamResponse(run, events, first)
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
            for name, value in headers.items():
                response[name] = value
            return response
        answer: Answer | None = None
        async for event in run.events():
            if isinstance(event, Answer):
                answer = event
        assert answer is not None
        body = openai_wire.completion_object(
            request_id=run.request_id, model=run.model, created=run.created, answer=answer
        )
        # Rendered here, once, by msgspec: a DRF Response would be rendered by Django in a
        # thread hand-off after the view. Headers read after the answer: an escalation
        # changes the model that answered.
        whole = HttpResponse(openai_wire.json_body(body), content_type="application/json")
        for name, value in _response_headers(run).items():
            whole[name] = value
        return whole
