"""Fast/slow routing: which model answers a request for ``model: "auto"`` (``model_choose``),
and the rules both this choice and escalation read (``routing_rules``).

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

A request routed to the fast model, not streamed, may have its answer escalated to the slow
model (``ModelChoice.escalation`` says how): ``webplatform.completions.escalation``.

The rules are ``settings.ROUTING`` over ``DEFAULT_ROUTING`` (a key given replaces the
default's value; ``docs/routing.md`` lists them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgspec
from django.conf import settings

from tenants.errors import ApplicationError
from tenants.principals import AUTO_MODEL, ApiPrincipal
from webplatform.completions.request import ChatCompletionInput, ImageSource, StoredImage
from webplatform.uploads.services import ValidatedImage

__all__ = [
    "AUTO_MODEL",
    "ModelChoice",
    "auto_offered",
    "check_auto_allowed",
    "model_choose",
    "routing_rules",
]

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
