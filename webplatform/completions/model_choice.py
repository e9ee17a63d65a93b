"""Fast/slow routing: which model answers a request for ``model: "auto"``, and when a fast
answer is escalated to the slow model.

``model_choose`` runs after the images are validated (their pixels are known) and before
the answer cache (whose key names the chosen model). A request that names its model is not
routed. For ``auto`` the first rule that matches decides, in this order:

==================  ======================================================================
rule                the request goes to
==================  ======================================================================
``plan``            the only one of the two models the plan (and the key) allows
``quality``         slow, when the request asks ``"quality": "high"``
``image_pixels``    slow, when an image has more than ``max_fast_image_pixels`` pixels (as sent)
``image_count``     slow, with more than ``max_fast_images`` images
``prompt_length``   slow, with more than ``max_fast_prompt_chars`` characters of text
``intent:<name>``   slow, when the newest user turn matches an intent's keywords or regexes
``default``         fast
==================  ======================================================================

Escalation (``Escalation``): a request routed to the fast model, not streamed, whose fast
answer finished (not cancelled) with low confidence is asked again of the slow model and answered
by it: ``escalate:logprob`` when the answer's mean token log-probability (``DoneEvent``'s
``mean_logprob``, when the engine reports it) is under ``min_mean_logprob``, else
``escalate:unsure`` when the answer matches an ``unsure_patterns`` regex ("I'm not sure",
"无法确定"...). If the slow model fails, the fast answer is served after all. A streamed
request is routed before its first token and never escalated.

The rules are ``settings.ROUTING`` over ``DEFAULT_ROUTING`` (a key given replaces the
default's value; ``docs/routing.md`` lists them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import msgspec
from django.conf import settings

from inference.protocol import DeltaEvent, DoneEvent, ErrorEvent, Event, FinishReason
from tenants.errors import ApplicationError
from tenants.principals import AUTO_MODEL, ApiPrincipal
from webplatform.completions.request import ChatCompletionInput, ImageSource, StoredImage
from webplatform.uploads.services import ValidatedImage

if TYPE_CHECKING:
    from webplatform.completions.streaming import CompletionRun

__all__ = [
    "AUTO_MODEL",
    "ModelChoice",
    "auto_offered",
    "check_auto_allowed",
    "escalating_source",
    "model_choose",
]

logger = logging.getLogger(__name__)

DEFAULT_ROUTING: dict[str, Any] = {
    "fast_model": "glm-4.6v-flash",
    # Empty: "auto" always answers with the fast model.
    "slow_model": "",
    "max_fast_image_pixels": 4_000_000,
    "max_fast_images": 2,
    "max_fast_prompt_chars": 12_000,
    # Newest user turn -> slow model. Keywords match as substrings, case-insensitively;
    # regexes as written (case-sensitive: "(?i)" in one makes it case-insensitive).
    "intents": {
        "legal_review": {
            "keywords": [
                "contract",
                "agreement",
                "clause",
                "liability",
                "indemnif",
                "legal review",
                "terms and conditions",
                "合同",
                "协议",
                "条款",
                "法律",
                "违约",
                "免责",
            ],
            "regexes": [r"\bNDA\b", r"\b[Rr]eview (this|the) (lease|contract|agreement)"],
        },
        "multi_step_math": {
            "keywords": [
                "prove",
                "derive",
                "step by step",
                "solve for",
                "integral",
                "equation",
                "证明",
                "推导",
                "方程",
                "积分",
                "求解",
                "计算过程",
            ],
            "regexes": [r"\d+\s*[-+*/^]\s*\d+\s*[-+*/^=]\s*\d+", r"\\(frac|int|sum)\b"],
        },
        "long_document": {
            "keywords": [
                "whole document",
                "entire document",
                "every page",
                "summarize the report",
                "summarise the report",
                "全文",
                "整篇",
                "整份",
                "文档总结",
                "每一页",
            ],
            "regexes": [r"\b\d{2,}\s*(pages|页)"],
        },
    },
    "escalation": {
        "enabled": True,
        "min_mean_logprob": -1.5,
        "unsure_patterns": [
            r"\bI(?:'| a)m not (?:sure|certain)\b",
            r"\bI (?:don't|do not|cannot|can't) (?:know|tell|determine)\b",
            r"\bunable to (?:determine|tell|read)\b",
            r"不确定",
            r"无法(?:确定|判断|识别|回答)",
            r"不知道",
            r"看不清",
        ],
    },
}


class Intent(msgspec.Struct, frozen=True):
    keywords: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()


class EscalationRules(msgspec.Struct, frozen=True):
    enabled: bool = True
    min_mean_logprob: float = -1.5
    unsure_patterns: tuple[str, ...] = ()


class RoutingRules(msgspec.Struct, frozen=True):
    fast_model: str
    slow_model: str = ""
    max_fast_image_pixels: int = 4_000_000
    max_fast_images: int = 2
    max_fast_prompt_chars: int = 12_000
    intents: dict[str, Intent] = {}
    escalation: EscalationRules = EscalationRules()


@dataclass(frozen=True)
class _Compiled:
    rules: RoutingRules
    intents: tuple[tuple[str, tuple[str, ...], re.Pattern[str] | None], ...]
    unsure: re.Pattern[str] | None


def _join(patterns: Sequence[str], flags: int = 0) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), flags) if patterns else None


@lru_cache(maxsize=8)
def _compile(raw: str) -> _Compiled:
    rules = msgspec.json.decode(raw, type=RoutingRules)
    intents = tuple(
        (name, tuple(k.casefold() for k in intent.keywords), _join(intent.regexes))
        for name, intent in rules.intents.items()
    )
    return _Compiled(rules, intents, _join(rules.escalation.unsure_patterns, re.IGNORECASE))


def routing_rules() -> _Compiled:
    """``settings.ROUTING`` over the defaults, checked and compiled (cached per value)."""
    merged = {**DEFAULT_ROUTING, **dict(getattr(settings, "ROUTING", None) or {})}
    return _compile(msgspec.json.encode(merged).decode())


@dataclass(frozen=True)
class ModelChoice:
    model: str  # the model to submit to
    rule: str  # the rule that picked it; "" when the request named its model
    escalation: EscalationRules | None = None  # set when a fast answer may be escalated
    slow_model: str = ""
    # Where the degradation step sends it when ``model`` cannot serve now: a request routed
    # to the slow model degrades to the fast one (None: the plan's fallback).
    fallback: str | None = None

    @property
    def routed(self) -> bool:
        return bool(self.rule)


def _not_found(model: str) -> ApplicationError:
    return ApplicationError(
        f"The model '{model}' does not exist or you do not have access to it.",
        code="model_not_found",
        status=404,
        param="model",
    )


def _newest_user_text(inp: ChatCompletionInput) -> str:
    for turn in reversed(inp.turns):
        if turn.role == "user":
            return "\n".join(p for p in turn.parts if isinstance(p, str))
    return ""


def _image_pixels(
    inp: ChatCompletionInput, images: Mapping[ImageSource, ValidatedImage]
) -> list[int]:
    pixels = []
    for turn in inp.turns:
        for part in turn.parts:
            if isinstance(part, ImageSource) and part in images:
                img = images[part]
                pixels.append((img.original_width * img.original_height) or img.width * img.height)
            elif isinstance(part, StoredImage):
                pixels.append(part.width * part.height)
    return pixels


def _rule(
    inp: ChatCompletionInput,
    images: Mapping[ImageSource, ValidatedImage],
    compiled: _Compiled,
    quality: str | None,
) -> str | None:
    """The rule sending the request to the slow model, or None for the fast one."""
    rules = compiled.rules
    if quality == "high":
        return "quality"
    pixels = _image_pixels(inp, images)
    if any(p > rules.max_fast_image_pixels for p in pixels):
        return "image_pixels"
    if len(pixels) > rules.max_fast_images:
        return "image_count"
    chars = sum(len(p) for t in inp.turns for p in t.parts if isinstance(p, str))
    if chars > rules.max_fast_prompt_chars:
        return "prompt_length"
    text = _newest_user_text(inp)
    folded = text.casefold()
    for name, keywords, regex in compiled.intents:
        if any(k in folded for k in keywords) or (regex is not None and regex.search(text)):
            return f"intent:{name}"
    return None


def model_choose(
    *,
    principal: ApiPrincipal,
    inp: ChatCompletionInput,
    images: Mapping[ImageSource, ValidatedImage],
) -> ModelChoice:
    """The model that answers ``inp``: the one it names, or for ``auto`` the fast or the slow
    model by the routing rules. 404 ``model_not_found`` when the plan allows neither."""
    if inp.model != AUTO_MODEL:
        return ModelChoice(model=inp.model, rule="")
    compiled = routing_rules()
    rules = compiled.rules
    allowed = principal.allowed_models
    fast = rules.fast_model if rules.fast_model in allowed else ""
    slow = rules.slow_model if rules.slow_model in allowed else ""
    if not fast and not slow:
        raise _not_found(AUTO_MODEL)
    if not fast or not slow or fast == slow:
        return ModelChoice(model=fast or slow, rule="plan")
    rule = _rule(inp, images, compiled, inp.quality)
    if rule is not None:
        return ModelChoice(model=slow, rule=rule, fallback=fast)
    escalation = rules.escalation if rules.escalation.enabled and not inp.stream else None
    return ModelChoice(model=fast, rule="default", escalation=escalation, slow_model=slow)


def check_auto_allowed(*, principal: ApiPrincipal) -> None:
    """404 for ``auto`` when the plan allows neither routed model (before the quota)."""
    rules = routing_rules().rules
    allowed = principal.allowed_models
    if rules.fast_model not in allowed and rules.slow_model not in allowed:
        raise _not_found(AUTO_MODEL)


def auto_offered(allowed_models: Sequence[str]) -> bool:
    """Whether the playground offers ``auto``: a slow model is configured (else ``auto`` is
    only another name of the fast one) and the caller may use one of the two."""
    rules = routing_rules().rules
    if not rules.slow_model:
        return False
    return rules.fast_model in allowed_models or rules.slow_model in allowed_models


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
