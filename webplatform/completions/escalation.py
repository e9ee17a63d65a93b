"""Escalation: a fast answer with low confidence asked again of the slow model.

A request that ``model_choose`` routed to the fast model, not streamed (its
``ModelChoice.escalation`` is set), whose fast answer finished (not cancelled) with low
confidence is asked again of the slow model and answered by it: ``escalate:logprob`` when
the answer's mean token log-probability (``DoneEvent``'s ``mean_logprob``, when the engine
reports it) is under ``min_mean_logprob``, else ``escalate:unsure`` when the answer matches
an ``unsure_patterns`` regex ("I'm not sure", "无法确定"...). If the slow model fails, the
fast answer is served after all. A streamed request is routed before its first token and
never escalated. The rules are the routing rules' ``escalation`` (docs/routing.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from inference.protocol import DeltaEvent, DoneEvent, ErrorEvent, Event, FinishReason
from webplatform.completions.model_choice import EscalationRules, ModelChoice, routing_rules

if TYPE_CHECKING:
    from webplatform.completions.streaming import CompletionRun

__all__ = ["escalating_source", "escalation_rule"]

logger = logging.getLogger(__name__)


def escalation_rule(answer_text: str, done: DoneEvent, rules: EscalationRules) -> str | None:
    """Why a finished fast answer goes to the slow model, or None when it stands."""
    if done.finish_reason is FinishReason.CANCELLED:
        return None
    if done.mean_logprob is not None and done.mean_logprob < rules.min_mean_logprob:
        return "escalate:logprob"
    unsure = routing_rules().unsure
    if unsure is not None and unsure.search(answer_text):
        return "escalate:unsure"
    return None


async def escalating_events(
    *,
    fast: Callable[[], AsyncIterator[Event]],
    slow: Callable[[], AsyncIterator[Event]],
    rules: EscalationRules,
    on_escalate: Callable[[str, DoneEvent], Awaitable[None]],
    on_kept: Callable[[], Awaitable[None]],
) -> AsyncIterator[Event]:
    """The events of a non-streamed request routed to the fast model: the fast model's,
    buffered until its answer is done; when that answer is unsure, the slow model's instead
    (``on_escalate(rule, fast_done)`` first). If the slow model fails, the fast answer after
    all (``on_kept()`` first)."""
    buffered: list[Event] = []
    text: list[str] = []
    done: DoneEvent | None = None
    async for event in fast():  # ends after its terminal event
        if isinstance(event, ErrorEvent):
            yield event
            return
        buffered.append(event)
        if isinstance(event, DeltaEvent):
            text.append(event.text)
        elif isinstance(event, DoneEvent):
            done = event
    if done is None:
        return
    rule = escalation_rule("".join(text), done, rules)
    if rule is None:
        for event in buffered:
            yield event
        return
    await on_escalate(rule, done)
    slow_events: list[Event] = []
    async for event in slow():
        if isinstance(event, ErrorEvent):
            logger.warning("escalation failed (%s); serving the fast answer", event.code)
            await on_kept()
            for buffered_event in buffered:
                yield buffered_event
            return
        slow_events.append(event)
    for event in slow_events:
        yield event


def escalating_source(
    *, run: CompletionRun, choice: ModelChoice
) -> Callable[[], AsyncIterator[Event]]:
    """The run's events with escalation: what ``CompletionRun.events`` reads instead of the
    fast model's own. Escalating makes the slow model the run's and the settlement's model
    (the response's ``model``, the usage record) and keeps the fast answer's tokens on the
    settlement; a failed escalation puts the fast model back."""
    fast_request = run.inference_request
    rules = choice.escalation
    assert fast_request is not None and rules is not None
    slow_request = msgspec.structs.replace(
        fast_request, request_id=f"{fast_request.request_id}-slow", model=choice.slow_model
    )
    settlement, fast_model = run.settlement, run.model

    def answered_by(model: str, rule: str, request: Any) -> None:
        settlement.model = model
        settlement.route_rule = rule
        run.model = run.requested_model = model
        run.route_rule = rule
        run.inference_request = request

    async def on_escalate(rule: str, done: DoneEvent) -> None:
        for image in run.images:  # the slow model's client holds its own copy
            await run.client.put_model_image(
                model=choice.slow_model,
                tenant_id=fast_request.tenant_id,
                data=image.data,
                ref=image.ref(),
            )
        settlement.escalated_from = fast_model
        settlement.escalated_usage = done.usage
        settlement.cache_key = None  # the answer is not the chosen model's
        answered_by(choice.slow_model, rule, slow_request)

    async def on_kept() -> None:
        settlement.escalated_from = ""
        settlement.escalated_usage = None
        answered_by(fast_model, "escalate:failed", fast_request)

    def source() -> AsyncIterator[Event]:
        return escalating_events(
            fast=lambda: run.client.submit(fast_request),
            slow=lambda: run.client.submit(slow_request),
            rules=rules,
            on_escalate=on_escalate,
            on_kept=on_kept,
        )

    return source
