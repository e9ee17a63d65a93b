"""Step 1, admit: may this caller ask this, and is there quota left for it.

The checks (``check_*``) raise ``ApplicationError`` and change nothing. Then one action,
``completion_admit``, takes the quota in one atomic step (``tenants.services.quotas.quota_admit``,
a Lua script: requests per minute, tokens per day reserving ``max_tokens`` plus a prompt
estimate, a concurrency lease). From there the admission must be given back exactly once:
settlement (``webplatform.completions.settlement``), also when the request fails before it
streams (``Settlement.settle_refused``); or here, when the request was cancelled (the
client went away) while its admission was being taken, so that nobody got it to settle.
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

from tenants.errors import ApplicationError
from tenants.outages import STORE_OUTAGES, store_unavailable_error
from tenants.principals import ApiPrincipal, EffectiveLimits
from tenants.services.quotas import Admission, quota_admit, quota_release
from tenants.services.spend import spend_limit_check
from webplatform.completions.background import background
from webplatform.completions.request import ChatCompletionInput
from webplatform.uploads.services import UploadLimits

logger = logging.getLogger(__name__)

# The answer length of a request that names none, unless the plan allows less.
DEFAULT_MAX_TOKENS = 1024


def max_tokens_for(*, inp: ChatCompletionInput, limits: EffectiveLimits) -> int:
    """The request's ``max_tokens``, or the default its plan allows."""
    return inp.max_tokens or min(limits.max_output_tokens, DEFAULT_MAX_TOKENS)


def upload_limits_for(*, limits: EffectiveLimits) -> UploadLimits:
    return UploadLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=settings.IMAGE_MAX_PIXELS,
        max_images=settings.IMAGE_MAX_PER_REQUEST,
    )


def check_model_allowed(*, principal: ApiPrincipal, model: str) -> None:
    """404 ``model_not_found`` for a model the plan or the key's scope does not allow."""
    if model not in principal.allowed_models:
        raise ApplicationError(
            f"The model '{model}' does not exist or you do not have access to it.",
            code="model_not_found",
            status=404,
            param="model",
        )


def check_max_tokens(*, limits: EffectiveLimits, max_tokens: int) -> None:
    """400 ``max_tokens_too_large`` beyond the plan's answer length."""
    if max_tokens > limits.max_output_tokens:
        raise ApplicationError(
            f"max_tokens is too large: {max_tokens}. This plan allows at most "
            f"{limits.max_output_tokens} completion tokens.",
            code="max_tokens_too_large",
            param="max_tokens",
        )


def check_image_count(*, inp: ChatCompletionInput, upload_limits: UploadLimits) -> None:
    """400 ``too_many_images`` before any image is decoded."""
    upload_limits.check_count(inp.image_count)


def text_chars(inp: ChatCompletionInput) -> int:
    """The characters of every text part of the conversation (history included)."""
    return sum(len(p) for turn in inp.turns for p in turn.parts if isinstance(p, str))


def check_text_size(*, inp: ChatCompletionInput) -> None:
    """413 ``request_too_large`` for more text than ``CHAT_MAX_TEXT_CHARS``: refused before
    the quota is touched or a tokenizer sees it (tokenizing 2 M characters takes seconds)."""
    chars, cap = text_chars(inp), settings.CHAT_MAX_TEXT_CHARS
    if chars > cap:
        raise ApplicationError(
            f"The request's text is {chars} characters; at most {cap} are accepted.",
            code="request_too_large",
            status=413,
            param="messages",
        )


def prompt_token_estimate(inp: ChatCompletionInput) -> int:
    """A cheap upper-side guess of the prompt's tokens for the daily-token reservation.

    Images are not counted: their token count is known only after validation, and settlement
    charges the real figure anyway.
    """
    return text_chars(inp) // 3 + 16 * len(inp.turns)


async def completion_admit(*, principal: ApiPrincipal, reserve_tokens: int) -> Admission:
    """Take a request, ``reserve_tokens`` and a concurrency lease from the tenant's quota;
    429 with the limit's own code (and ``retry-after``) when one is used up; 503
    ``service_unavailable`` when Redis is down or hung."""
    # One thread hand-off for both steps (each costs a wake-up of a thread and of the loop).
    admitting = asyncio.ensure_future(
        sync_to_async(_admit, thread_sensitive=False)(
            principal=principal, reserve_tokens=reserve_tokens
        )
    )
    try:
        # Shielded: the thread runs on when the request is cancelled meanwhile (the client
        # went away), and the lease it takes then is nobody's: given back when it is in,
        # not held until QUOTA_LEASE_SECONDS against the tenant's concurrent requests.
        return await asyncio.shield(admitting)
    except asyncio.CancelledError:
        # (A loop shutting down cancels ``admitting`` too: a lease taken then expires on its
        # own, as every lease of a process that dies does.)
        admitting.add_done_callback(_release_unclaimed)
        raise


def _release_unclaimed(admitting: asyncio.Future[Admission]) -> None:
    if admitting.cancelled() or admitting.exception() is not None:
        return  # refused (or failed): nothing was taken
    admission = admitting.result()
    logger.info("the client went away while its quota was taken; giving the lease back")
    background(sync_to_async(_release, thread_sensitive=False)(admission=admission))


def _release(*, admission: Admission) -> None:
    try:
        quota_release(admission=admission)
    except STORE_OUTAGES:  # Redis down: the lease expires on its own
        logger.warning("could not give back an unclaimed quota lease", exc_info=True)
    except Exception:
        logger.exception("giving back an unclaimed quota lease failed")


def _admit(*, principal: ApiPrincipal, reserve_tokens: int) -> Admission:
    # The monthly spend limit first: it refuses without taking anything from the quota.
    spend_limit_check(tenant_id=principal.tenant_id)
    try:
        return quota_admit(
            tenant_id=principal.tenant_id, limits=principal.limits, reserve_tokens=reserve_tokens
        )
    except STORE_OUTAGES as exc:
        raise store_unavailable_error() from exc
