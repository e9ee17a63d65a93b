"""``POST /v1/chat/completions``: OpenAI-compatible, plain JSON or Server-Sent Events.

An async view (adrf): a completion may take seconds, and a sync view under ASGI would hold
Django's single sync thread for all of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from adrf.views import APIView as AsyncAPIView
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.errors import ApplicationError
from webplatform.api import openai_wire
from webplatform.api.base import AuthenticatedApiView
from webplatform.api.chat_serializers import ChatCompletionRequestSerializer
from webplatform.completions.inputs import Channel
from webplatform.completions.service import (
    Caller,
    CompletionOutcome,
    CompletionRun,
    TextDelta,
    chat_completion_start,
)

logger = logging.getLogger(__name__)


def _response_headers(run: CompletionRun) -> dict[str, str]:
    headers = {
        "x-request-id": run.request_id,
        "x-cache": "hit" if run.cache_hit else "miss",
        **run.rate_limit_headers,
    }
    if run.fallback:
        headers["x-model-fallback"] = f"{run.requested_model} -> {run.model}"
    return headers


async def _sse_stream(run: CompletionRun) -> AsyncIterator[bytes]:
    common = {"request_id": run.request_id, "model": run.model, "created": run.created}
    include_usage = run.input.include_usage
    yield openai_wire.sse(
        openai_wire.chunk_object(
            **common, delta={"role": "assistant", "content": ""}, with_usage_field=include_usage
        )
    )
    events = run.events()
    try:
        async for item in events:
            if isinstance(item, TextDelta):
                delta: dict[str, str] = {}
                if item.reasoning:
                    delta["reasoning_content"] = item.reasoning
                if item.text:
                    delta["content"] = item.text
                if delta:
                    yield openai_wire.sse(
                        openai_wire.chunk_object(
                            **common, delta=delta, with_usage_field=include_usage
                        )
                    )
            elif isinstance(item, CompletionOutcome):
                yield openai_wire.sse(
                    openai_wire.chunk_object(
                        **common,
                        delta={},
                        finish_reason=item.finish_reason,
                        with_usage_field=include_usage,
                    )
                )
                if include_usage:
                    yield openai_wire.sse(
                        openai_wire.chunk_object(
                            **common,
                            usage=openai_wire.usage_object(item),
                            with_usage_field=True,
                        )
                    )
    except ApplicationError as exc:
        # Headers are gone; OpenAI reports a mid-stream failure as an error event.
        yield openai_wire.sse(exc.as_openai())
    except asyncio.CancelledError:
        logger.info("client went away during %s; cancelled", run.request_id)
        raise
    finally:
        await events.aclose()
    yield openai_wire.SSE_DONE


class ChatCompletionsApi(AuthenticatedApiView, AsyncAPIView):
    """Async dispatch from adrf; rate-limit headers on every response from the base view."""

    @extend_schema(
        operation_id="createChatCompletion",
        request=ChatCompletionRequestSerializer,
        responses={
            200: OpenApiResponse(description="chat.completion, or SSE chat.completion.chunk")
        },
        summary="Create a chat completion (OpenAI-compatible; images as data URIs)",
    )
    async def post(self, request: Request) -> Response | StreamingHttpResponse:
        serializer = ChatCompletionRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        inp = serializer.to_input(default_model=request.user.default_model)
        if request.headers.get("cache-control", "").lower() == "no-store":
            from dataclasses import replace

            inp = replace(inp, use_cache=False)
        run = await chat_completion_start(
            caller=Caller(principal=request.user, channel=Channel.REST), inp=inp
        )
        headers = _response_headers(run)
        if inp.stream:
            response = StreamingHttpResponse(_sse_stream(run), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
            for name, value in headers.items():
                response[name] = value
            return response
        outcome: CompletionOutcome | None = None
        async for item in run.events():
            if isinstance(item, CompletionOutcome):
                outcome = item
        assert outcome is not None
        body = openai_wire.completion_object(
            request_id=run.request_id, model=run.model, created=run.created, outcome=outcome
        )
        return Response(body, headers=headers)
