"""Step 7, settle: what an admitted request owes, paid exactly once however it ends.

A ``Settlement`` is made with the run (``webplatform.completions.pipeline``); the stream
records on it what the worker reported (``record_start``, ``record_delta``), and ``settle``
pays, once, whether the stream finished, failed, was cancelled or was abandoned by a client
that went away (a second call does nothing):

- quota: settled with the tokens used (prompt + completion; a cache hit costs none), or
  released untouched when the failure was ours;
- the usage record and the content log (``webplatform.completions.records``; the content
  log keeps nothing unless the organisation turned it on); these two database writes go
  after the response, in a batch with other requests', where the entry point can defer
  them (``defer_records``, REST through ``webplatform.after_response``), the quota never;
- the answer cache, for a finished deterministic answer of the model asked for;
- the metrics (the error's code too) and one log line, ``completion settled``
  (``webplatform.log_context``).

Settling never raises: a served answer must not turn into an error because its bookkeeping
failed (the failure is logged).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async

from inference.protocol import DeltaEvent, StartEvent, Usage
from tenants.errors import ApplicationError
from tenants.services.content_logging import ContentLogItem
from tenants.services.quotas import Admission, quota_release, quota_settle
from tenants.services.usage import usage_record_build
from webplatform.after_response import Deferral
from webplatform.completions.answer import Answer
from webplatform.completions.cache import answer_cache_store
from webplatform.completions.records import RequestRecords, record_writer, records_write
from webplatform.completions.request import Caller
from webplatform.log_context import log_completion_settled
from webplatform.metrics import completion_observe
from webplatform.uploads.services import ValidatedImage

logger = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """How a request ended: the usage record's ``status``."""

    OK = "ok"
    ERROR = "error"  # our failure (or the model's): the tenant is charged nothing
    CANCELLED = "cancelled"  # the client stopped it or went away: charged what it consumed


@dataclass
class Settlement:
    request_id: str
    caller: Caller
    admission: Admission
    model: str  # the model that answered (a fallback's name when one did)
    images: Sequence[ValidatedImage]
    prompt_text: str  # the user's newest question as text, for the content log
    # Where a finished answer is stored; None when the request is not deterministic, opted
    # out, was answered by a fallback, or was itself served from the cache.
    cache_key: str | None
    cache_hit: bool
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prompt_tokens_seen: int = 0
    image_tokens_seen: int = 0
    tokens_streamed: int = 0
    settled: bool = False
    # Routing (webplatform.completions.model_choice): the rule that chose ``model``; and a
    # fast answer escalated to it (webplatform.completions.escalation: its model and
    # tokens, charged as well).
    route_rule: str = ""
    escalated_from: str = ""
    escalated_usage: Usage | None = None
    # Where the usage record and content log go when they may be written after the
    # response (webplatform.after_response); None: written before settle() returns.
    defer_records: Deferral | None = None

    def record_start(self, event: StartEvent) -> None:
        self.prompt_tokens_seen = event.prompt_tokens
        self.image_tokens_seen = event.image_tokens

    def record_delta(self, event: DeltaEvent) -> None:
        self.tokens_streamed += event.tokens
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def _usage(self, answer: Answer | None) -> Usage:
        # A stream that ended early is recorded with what it consumed: its prompt and the
        # tokens already streamed. A client that hangs up is charged that, or reading an
        # answer and hanging up just before its end would cost nothing.
        if answer is not None:
            return answer.usage
        return Usage(
            prompt_tokens=self.prompt_tokens_seen,
            completion_tokens=self.tokens_streamed,
            image_tokens=self.image_tokens_seen,
        )

    def _pay_quota(self, *, outcome: Outcome, usage: Usage) -> None:
        """Settle or release the admission's quota lease (blocking: Redis)."""
        try:
            # Our failure costs the tenant nothing; a request the client abandoned is charged
            # what it consumed (see _usage).
            if outcome is Outcome.ERROR:
                quota_release(admission=self.admission)
            else:
                # Cache hits cost no model tokens; they still count as requests.
                used = 0 if self.cache_hit else usage.prompt_tokens + usage.completion_tokens
                if self.escalated_usage is not None:
                    used += self.escalated_usage.total_tokens
                quota_settle(admission=self.admission, used_tokens=used)
        except Exception:  # Redis down: the lease expires on its own; the record is kept
            logger.exception("settling the quota of request %s failed", self.request_id)

    def _records(
        self,
        *,
        outcome: Outcome,
        error_code: str,
        answer: Answer | None,
        usage: Usage,
        ttft_ms: int | None,
        latency_ms: int,
    ) -> RequestRecords | None:
        """The usage record and the content log's text (None, logged, when the record
        cannot be made: settling never raises)."""
        try:
            principal = self.caller.principal
            record = usage_record_build(
                tenant=principal.tenant,
                api_key=principal.api_key,
                user=principal.user,
                request_id=self.request_id,
                channel=self.caller.entry_point.value,
                model=self.model,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                image_tokens=usage.image_tokens,
                image_count=len(self.images),
                image_bytes=sum(img.original_size for img in self.images),
                time_to_first_token_ms=ttft_ms,
                total_latency_ms=latency_ms,
                status=outcome.value,
                error_code=error_code,
                cache_hit=self.cache_hit,
                route_rule=self.route_rule,
                escalated_from=self.escalated_from,
                escalated_prompt_tokens=(self.escalated_usage or Usage()).prompt_tokens,
                escalated_completion_tokens=(self.escalated_usage or Usage()).completion_tokens,
            )
        except Exception:  # settlement must never turn a served answer into an error
            logger.exception("settling request %s failed", self.request_id)
            return None
        # Kept only when the organisation turned content logging on (checked when written).
        content = (
            None
            if answer is None
            else ContentLogItem(
                tenant=principal.tenant,
                request_id=self.request_id,
                prompt=self.prompt_text,
                answer=answer.text,
            )
        )
        return RequestRecords(usage=record, content=content)

    async def settle_refused(self, exc: BaseException) -> None:
        """Settle a request that failed after admission and before it was submitted (an
        image refused, no worker, ...): quota given back untouched, a usage record with
        the error's code (``cancelled`` when the client went away meanwhile)."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            await self.settle(outcome=Outcome.CANCELLED, error_code="", answer=None)
        else:
            code = exc.code if isinstance(exc, ApplicationError) else "internal_error"
            await self.settle(outcome=Outcome.ERROR, error_code=code, answer=None)

    async def settle(self, *, outcome: Outcome, error_code: str, answer: Answer | None) -> None:
        """Pay what the request owes; only the first call does anything."""
        if self.settled:
            return
        self.settled = True
        now = time.monotonic()
        usage = self._usage(answer)
        ttft_ms = (
            None
            if self.first_token_at is None
            else int((self.first_token_at - self.started_at) * 1000)
        )
        records = self._records(
            outcome=outcome,
            error_code=error_code,
            answer=answer,
            usage=usage,
            ttft_ms=ttft_ms,
            latency_ms=int((now - self.started_at) * 1000),
        )
        # Only a served answer's records wait for the response: an error's record must be
        # in before its response (rejections.py records refusals, first one wins).
        if self.defer_records is None or answer is None:

            def pay() -> None:  # a failure of one is logged and does not stop the next
                self._pay_quota(outcome=outcome, usage=usage)
                if records is not None:
                    records_write([records])

            # Quota, usage record and content log in one thread hand-off (each hand-off is
            # a wake-up of a thread and of the event loop on the client's critical path).
            await sync_to_async(pay, thread_sensitive=False)()
        else:
            # The quota now (the client's next request must see its lease gone), the two
            # database writes after the response, in a batch with other requests'
            # (webplatform.after_response, webplatform.completions.records).
            await sync_to_async(self._pay_quota, thread_sensitive=False)(
                outcome=outcome, usage=usage
            )
            if records is not None:
                write = functools.partial(record_writer().write, records)
                if not self.defer_records(write):  # too late to defer: now
                    await write()
        if outcome is Outcome.OK and answer is not None and self.cache_key is not None:
            await answer_cache_store(key=self.cache_key, answer=answer)  # never raises
        completion_observe(
            model=self.model,
            channel=self.caller.entry_point.value,
            status=outcome.value,
            cache_hit=self.cache_hit,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_s=None if ttft_ms is None else ttft_ms / 1000,
            latency_s=now - self.started_at,
            error_code=error_code,
        )
        log_completion_settled(
            request_id=self.request_id,
            principal=self.caller.principal,
            channel=self.caller.entry_point.value,
            model=self.model,
            status=outcome.value,
            error_code=error_code,
            cache_hit=self.cache_hit,
            usage=usage,
            image_count=len(self.images),
            ttft_s=None if ttft_ms is None else ttft_ms / 1000,
            latency_s=now - self.started_at,
            route_rule=self.route_rule,
        )
