"""Step 6, stream: the worker's events become the answer, and the run settles when it ends.

``CompletionRun.events()`` yields the worker's ``DeltaEvent`` items as they come and then one
``Answer`` (``webplatform.completions.answer``), and in its ``finally`` settles the request
(``webplatform.completions.settlement``) whatever way the stream ends: finished, failed,
cancelled, or abandoned by a client that went away. An inference error becomes the
``ApplicationError`` with the same code; a Redis outage while streaming becomes 503
``service_unavailable`` (``tenants.outages``), which an entry point that already sent its
headers reports in-band. Settlement that cannot reach Redis is logged, never raised over the
answer or the error: the quota lease then expires on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from django.conf import settings

from inference.client import InferenceClient
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    InferenceRequest,
    NoticeEvent,
    StartEvent,
)
from tenants.errors import ApplicationError
from tenants.outages import STORE_OUTAGES, store_unavailable_error
from webplatform.completions.answer import Answer, AnswerEvent
from webplatform.completions.background import background
from webplatform.completions.request import ChatCompletionInput
from webplatform.completions.settlement import Outcome, Settlement
from webplatform.completions.validation import ScanVerdicts
from webplatform.uploads.services import ValidatedImage

logger = logging.getLogger(__name__)

# Inference errors a client caused (4xx) versus ours (5xx).
_CLIENT_ERRORS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
}


def inference_error(event: ErrorEvent) -> ApplicationError:
    """The client's error for an inference ``ErrorEvent``: same code and message; 503 with a
    ``retry-after`` when a retry may succeed."""
    client_status = _CLIENT_ERRORS.get(event.code)
    retry = not client_status and event.retryable
    return ApplicationError(
        event.message,
        code=event.code.value,
        status=client_status or (503 if retry else 500),
        type="invalid_request_error" if client_status else "server_error",
        headers={"retry-after": str(settings.MODEL_UNAVAILABLE_RETRY_AFTER)} if retry else None,
    )


@dataclass
class CompletionRun:
    """An admitted request, submitted or answered from the cache. Iterate ``events()`` once;
    ``cancel()`` may be called any time; call ``abandon()`` when done with it."""

    request_id: str
    model: str  # the model that answers
    requested_model: str
    created: int
    input: ChatCompletionInput
    images: Sequence[ValidatedImage]
    client: InferenceClient
    inference_request: InferenceRequest | None  # None when answered from the cache
    cached: Answer | None
    settlement: Settlement
    answer: Answer | None = None
    route_rule: str = ""  # the routing rule that chose ``model`` ("" when it was named)
    # The events to read instead of ``client.submit(inference_request)`` (escalation).
    events_source: Callable[[], AsyncIterator[Event]] | None = None
    # The images' virus-scan verdicts: nothing is yielded before they are in (and clean).
    verdicts: ScanVerdicts | None = None
    # What the run answered with before any escalation (a refusal puts it back).
    _model_at_start: str = field(init=False, default="")
    _route_rule_at_start: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self._model_at_start = self.settlement.model
        self._route_rule_at_start = self.settlement.route_rule

    @property
    def cache_hit(self) -> bool:
        return self.cached is not None

    @property
    def fallback(self) -> bool:
        return self.model != self.requested_model

    @property
    def rate_limit_headers(self) -> dict[str, str]:
        return self.settlement.admission.headers

    async def cancel(self) -> None:
        if self.inference_request is not None and self.answer is None:
            await self.client.cancel(self.inference_request.request_id)

    async def events(self) -> AsyncGenerator[AnswerEvent, None]:
        """Stream the answer: ``DeltaEvent`` items, then one ``Answer``.

        Raises ``ApplicationError`` when inference fails before any text was sent; after
        text was sent, a failure ends the stream with that error too (the entry point
        reports it in-band). Settles the request exactly once, whatever happens.

        The images' scan verdicts come first: a refusal already read stops the request
        before its enqueue; one read while it runs cancels it in the worker and interrupts
        this task's wait for its first event (a cancel of the task, told apart from any
        other by ``uncancel``); and the first event waits for them all, so nothing of the
        answer is recorded or yielded before them, and a refusal is the request's error.
        """
        outcome, error_code = Outcome.ERROR, "internal_error"
        checked = self.verdicts is None
        waiting = False  # for the source's next event (the only place an interrupt lands)
        interrupted = False
        consumer = asyncio.current_task()
        source: AsyncIterator[Event] | None = None

        def refused() -> None:  # a refusal read while the request runs
            nonlocal interrupted
            background(self.cancel())
            if waiting and not checked and consumer is not None:
                interrupted = True
                consumer.cancel()

        try:
            if self.verdicts is not None and (self.cached is not None or self.verdicts.done()):
                await self._verdicts_passed()
                checked = True
            if self.cached is not None:
                delta = DeltaEvent(text=self.cached.text, reasoning=self.cached.reasoning)
                self.settlement.record_delta(delta)
                yield delta
                self.answer = self.cached
                outcome, error_code = Outcome.OK, ""
                yield self.cached
                return
            assert self.inference_request is not None
            if self.verdicts is not None and not checked:
                self.verdicts.when_refused(refused)
            text: list[str] = []
            reasoning: list[str] = []
            source = (
                self.events_source()
                if self.events_source is not None
                else self.client.submit(self.inference_request)
            )
            while True:
                waiting = True
                try:
                    event = await anext(source)
                except StopAsyncIteration:
                    break
                finally:
                    waiting = False
                if not checked:
                    await self._verdicts_passed()
                    checked = True
                if isinstance(event, StartEvent):
                    self.settlement.record_start(event)
                elif isinstance(event, DeltaEvent):
                    self.settlement.record_delta(event)
                    text.append(event.text)
                    reasoning.append(event.reasoning)
                    yield event
                elif isinstance(event, DoneEvent):
                    self.answer = Answer(
                        text="".join(text),
                        reasoning="".join(reasoning),
                        finish_reason=event.finish_reason,
                        usage=event.usage,
                    )
                    cancelled = event.finish_reason is FinishReason.CANCELLED
                    outcome = Outcome.CANCELLED if cancelled else Outcome.OK
                    error_code = ""
                    yield self.answer
                    return
                elif isinstance(event, ErrorEvent):
                    error_code = event.code.value
                    raise inference_error(event)
                elif isinstance(event, NoticeEvent):
                    yield event  # a streamed answer shows it; a whole one has no room
        except (GeneratorExit, asyncio.CancelledError) as exc:
            own = interrupted and isinstance(exc, asyncio.CancelledError)
            if own and consumer is not None and consumer.uncancel() == 0:
                # Our own interrupt, nobody else's cancel: the refusal is the error.
                refusal = await self._refusal()
                if refusal is not None:
                    error_code = refusal.code
                    raise refusal from None
            # The consumer went away (client disconnected, task cancelled): stop the work in
            # the worker so its batch slot frees at the next step. Once the answer is out
            # it was served whole: closing the stream then cancels nothing.
            if self.answer is None:
                outcome, error_code = Outcome.CANCELLED, ""
                if not checked:
                    self._undo_escalation()  # nothing of it was seen before the verdicts
                await asyncio.shield(self.cancel())
            raise exc
        except ApplicationError as exc:
            error_code = exc.code
            raise
        except STORE_OUTAGES as exc:
            # Before the first event (the enqueue): an image's refusal still wins.
            refusal = None if checked else await self._refusal()
            if refusal is not None:
                error_code = refusal.code
                raise refusal from exc
            unavailable = store_unavailable_error()
            error_code = unavailable.code
            raise unavailable from exc
        finally:
            if source is not None:  # at once, not when collected: its cancel mark, its HTTP
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await asyncio.shield(aclose())
            # Shielded: the task may be cancelled again while settling (a server closing the
            # connection cancels the handler, and that reaches the task it awaits); the
            # lease and the usage record must still be written.
            await self._settle_shielded(outcome=outcome, error_code=error_code)

    async def _verdicts_passed(self) -> None:
        """Raise the images' scan refusal, if any, as the request's error (``_refusal``)."""
        refusal = await self._refusal()
        if refusal is not None:
            raise refusal

    async def _refusal(self) -> ApplicationError | None:
        """The images' scan refusal, if any, with an escalation that ran meanwhile undone on
        the settlement: a refused request is recorded for the model it asked for, with
        nothing escalated."""
        refusal = None if self.verdicts is None else await self.verdicts.refusal()
        if refusal is not None:
            self._undo_escalation()
        return refusal

    def _undo_escalation(self) -> None:
        self.settlement.model = self._model_at_start
        self.settlement.route_rule = self._route_rule_at_start
        self.settlement.escalated_from = ""
        self.settlement.escalated_usage = None

    async def _settle_shielded(self, *, outcome: Outcome, error_code: str) -> None:
        try:
            await asyncio.shield(
                self.settlement.settle(outcome=outcome, error_code=error_code, answer=self.answer)
            )
        except STORE_OUTAGES:
            logger.warning(
                "settling %s: Redis unavailable; its quota lease expires on its own",
                self.request_id,
                exc_info=True,
            )

    async def abandon(self) -> None:
        """Settle a run whose ``events()`` never ran to its end or was never started (the
        client went away before the first byte of the body): release its admission and
        record it as cancelled. Harmless after a normal settlement; call it when done."""
        if self.settlement.settled:
            return
        try:
            await asyncio.shield(self.cancel())
        except STORE_OUTAGES:
            logger.warning("could not cancel %s: Redis unavailable", self.request_id)
        await self._settle_shielded(outcome=Outcome.CANCELLED, error_code="")
