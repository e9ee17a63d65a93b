"""A submitted chat completion: stream its answer and settle it exactly once.

``CompletionRun.events()`` yields the answer and, in its ``finally``, settles the request
(quota settlement or release, usage record, content log, metrics), whatever way the stream
ends: finished, failed, cancelled or abandoned by a client that went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async

from inference.client import InferenceClient
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    InferenceRequest,
    StartEvent,
    Usage,
)
from tenants.errors import ApplicationError
from tenants.principals import ApiPrincipal
from tenants.services.content_logging import content_log_record
from tenants.services.quotas import Admission, quota_release, quota_settle
from tenants.services.usage import usage_record_create
from webplatform.completions import answer_cache
from webplatform.completions.inputs import (
    Channel,
    ChatCompletionInput,
)
from webplatform.metrics import completion_observe
from webplatform.uploads.services import ValidatedImage

logger = logging.getLogger(__name__)

# Inference errors a client caused (4xx) versus ours (5xx).
_CLIENT_ERRORS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
}


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the entry point's authentication resolved it, and over what."""

    principal: ApiPrincipal
    channel: Channel

    @property
    def tenant(self) -> Any:
        return self.principal.tenant


@dataclass(frozen=True)
class TextDelta:
    text: str = ""
    reasoning: str = ""


@dataclass
class CompletionOutcome:
    text: str
    reasoning: str
    finish_reason: str
    usage: Usage
    cache_hit: bool = False


@dataclass
class CompletionRun:
    """A submitted request. Iterate ``events()`` once; ``cancel()`` may be called any time."""

    request_id: str
    model: str
    requested_model: str
    created: int
    admission: Admission
    caller: Caller
    input: ChatCompletionInput
    images: Sequence[ValidatedImage]
    inference_request: InferenceRequest | None
    cached: CompletionOutcome | None
    cache_key: str | None
    client: InferenceClient
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    outcome: CompletionOutcome | None = None
    _settled: bool = False
    _prompt_tokens_seen: int = 0
    _image_tokens_seen: int = 0
    _tokens_streamed: int = 0

    @property
    def cache_hit(self) -> bool:
        return self.cached is not None

    @property
    def fallback(self) -> bool:
        return self.model != self.requested_model

    @property
    def rate_limit_headers(self) -> dict[str, str]:
        return self.admission.headers

    async def cancel(self) -> None:
        if self.inference_request is not None and self.outcome is None:
            await self.client.cancel(self.request_id)

    async def events(self) -> AsyncIterator[TextDelta | CompletionOutcome]:
        """Stream the answer: ``TextDelta`` items, then one ``CompletionOutcome``.

        Raises ``ApplicationError`` when inference fails before any text was sent; after
        text was sent, a failure ends the stream with that error too (the entry point
        reports it in-band). Settles the request exactly once, whatever happens.
        """
        status, error_code = "error", "internal_error"
        try:
            if self.cached is not None:
                self.first_token_at = time.monotonic()
                yield TextDelta(text=self.cached.text, reasoning=self.cached.reasoning)
                self.outcome = self.cached
                status, error_code = "ok", ""
                yield self.cached
                return
            assert self.inference_request is not None
            text: list[str] = []
            reasoning: list[str] = []
            async for event in self.client.submit(self.inference_request):
                if isinstance(event, StartEvent):
                    self._prompt_tokens_seen = event.prompt_tokens
                    self._image_tokens_seen = event.image_tokens
                    continue
                if isinstance(event, DeltaEvent):
                    self._tokens_streamed += event.tokens
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    text.append(event.text)
                    reasoning.append(event.reasoning)
                    yield TextDelta(text=event.text, reasoning=event.reasoning)
                elif isinstance(event, DoneEvent):
                    self.outcome = CompletionOutcome(
                        text="".join(text),
                        reasoning="".join(reasoning),
                        finish_reason=event.finish_reason.value,
                        usage=event.usage,
                    )
                    if event.finish_reason is FinishReason.CANCELLED:
                        status, error_code = "cancelled", ""
                    else:
                        status, error_code = "ok", ""
                        if self.cache_key is not None:
                            await answer_cache.cache_store(key=self.cache_key, outcome=self.outcome)
                    yield self.outcome
                    return
                elif isinstance(event, ErrorEvent):
                    error_code = event.code.value
                    raise ApplicationError(
                        event.message,
                        code=event.code.value,
                        status=_CLIENT_ERRORS.get(event.code, 503 if event.retryable else 500),
                        type="invalid_request_error"
                        if event.code in _CLIENT_ERRORS
                        else "server_error",
                    )
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer went away (client disconnected, task cancelled): stop the work in
            # the worker so its batch slot frees at the next step. Once the outcome is out
            # the answer was served whole: closing the stream then cancels nothing.
            if self.outcome is None:
                status, error_code = "cancelled", ""
                await asyncio.shield(self.cancel())
            raise
        except ApplicationError as exc:
            error_code = exc.code
            raise
        finally:
            # Shielded: the task may be cancelled again while settling (a server closing the
            # connection cancels the handler, and that reaches the task it awaits); the
            # lease and the usage record must still be written.
            await asyncio.shield(self._settle(status=status, error_code=error_code))

    async def abandon(self) -> None:
        """Settle a run whose ``events()`` never ran to its end or was never started (the
        client went away before the first byte of the body): release its admission and
        record it as cancelled. Harmless after a normal settlement; call it when done."""
        if self._settled:
            return
        await asyncio.shield(self.cancel())
        await asyncio.shield(self._settle(status="cancelled", error_code=""))

    def _prompt_text(self) -> str:
        """The user's newest question as text (images are referenced, never logged)."""
        last = self.input.turns[-1]
        return "\n".join(p for p in last.parts if isinstance(p, str))

    async def _settle(self, *, status: str, error_code: str) -> None:
        if self._settled:
            return
        self._settled = True
        now = time.monotonic()
        # A stream that ended early is recorded with what it consumed: its prompt and the
        # tokens already streamed. A client that hangs up is charged that, or reading an
        # answer and hanging up just before its end would cost nothing.
        usage = (
            self.outcome.usage
            if self.outcome
            else Usage(
                prompt_tokens=self._prompt_tokens_seen,
                completion_tokens=self._tokens_streamed,
                image_tokens=self._image_tokens_seen,
            )
        )
        ttft_ms = (
            None
            if self.first_token_at is None
            else int((self.first_token_at - self.started_at) * 1000)
        )
        try:
            # Our failure costs the tenant nothing; a request the client abandoned is charged
            # what it consumed (see above).
            if status == "error":
                await sync_to_async(quota_release, thread_sensitive=False)(admission=self.admission)
            else:
                # Cache hits cost no model tokens; they still count as requests.
                used = 0 if self.cache_hit else usage.prompt_tokens + usage.completion_tokens
                await sync_to_async(quota_settle, thread_sensitive=False)(
                    admission=self.admission, used_tokens=used
                )
            await sync_to_async(usage_record_create, thread_sensitive=False)(
                tenant=self.caller.tenant,
                api_key=self.caller.principal.api_key,
                user=self.caller.principal.user,
                request_id=self.request_id,
                channel=self.caller.channel.value,
                model=self.model,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                image_tokens=usage.image_tokens,
                image_count=len(self.images),
                image_bytes=sum(img.original_size for img in self.images),
                time_to_first_token_ms=ttft_ms,
                total_latency_ms=int((now - self.started_at) * 1000),
                status=status,
                error_code=error_code,
                cache_hit=self.cache_hit,
            )
            if self.outcome is not None:
                # Kept only when the organisation turned content logging on (checked there).
                await sync_to_async(content_log_record, thread_sensitive=False)(
                    tenant=self.caller.tenant,
                    request_id=self.request_id,
                    prompt=self._prompt_text(),
                    answer=self.outcome.text,
                )
        except Exception:  # settlement must never turn a served answer into an error
            logger.exception("settling request %s failed", self.request_id)
        completion_observe(
            model=self.model,
            channel=self.caller.channel.value,
            status=status,
            cache_hit=self.cache_hit,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_s=None if ttft_ms is None else ttft_ms / 1000,
            latency_s=now - self.started_at,
        )
