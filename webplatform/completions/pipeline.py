"""The one request path of DESIGN.md, steps 2-7, shared by REST, websocket and playground.

Read it top to bottom: each step is a module of this package.

1. admit       ``admission``   checks (model, max_tokens, image count), then the quota
2. validate    ``validation``  every image, through ``webplatform.uploads`` (its virus
                               scan's verdict read meanwhile, awaited before step 6 yields)
3. cache       ``cache``       a deterministic request's answer, if one is stored
4. route       ``routing``     the model, its plan's fallback, or a 503
5. submit      ``submission``  images stored by reference, the ``InferenceRequest`` built
6. stream      ``streaming``   ``CompletionRun.events()``: the worker's events as the answer
7. settle      ``settlement``  quota, usage record, content log, cache store; exactly once

``chat_completion_start`` runs steps 1-5 and returns the ``CompletionRun`` for steps 6-7.
Any failure after admission gives the admission back and leaves a usage record (status
``error``, or ``cancelled`` when the client went away) before the error reaches the client:
every request that reached admission has one, whatever its outcome. Entry points only
translate wire formats.
"""

from __future__ import annotations

import asyncio
import logging
import time

from inference.client import get_inference_client
from tenants.errors import ApplicationError
from tenants.outages import STORE_OUTAGES, store_unavailable_error
from webplatform.completions.admission import (
    check_image_count,
    check_max_tokens,
    check_model_allowed,
    check_text_size,
    completion_admit,
    max_tokens_for,
    prompt_token_estimate,
    upload_limits_for,
)
from webplatform.completions.cache import answer_cache_key, answer_cache_lookup
from webplatform.completions.escalation import escalating_source
from webplatform.completions.model_choice import AUTO_MODEL, check_auto_allowed, model_choose
from webplatform.completions.request import Caller, ChatCompletionInput
from webplatform.completions.routing import model_route
from webplatform.completions.settlement import Settlement
from webplatform.completions.streaming import CompletionRun
from webplatform.completions.submission import completion_submit, inference_prompt
from webplatform.completions.validation import ScanVerdicts, images_validate
from webplatform.log_context import log_context_bind
from webplatform.metrics import admission_refused

logger = logging.getLogger(__name__)


async def chat_completion_start(
    *, caller: Caller, inp: ChatCompletionInput, request_id: str
) -> CompletionRun:
    """Steps 1-5. Raises ``ApplicationError`` for anything refused.

    ``request_id``: the id the entry point shows the client (REST: the ``x-request-id`` of
    the HTTP request); the usage record and the worker know the request by it.
    """
    principal = caller.principal
    limits = principal.limits

    # 1. Admit (a refusal is counted by its code: a fixed vocabulary, never the model).
    max_tokens = max_tokens_for(inp=inp, limits=limits)
    upload_limits = upload_limits_for(limits=limits)
    try:
        if inp.model == AUTO_MODEL:
            check_auto_allowed(principal=principal)
        else:
            check_model_allowed(principal=principal, model=inp.model)
        check_max_tokens(limits=limits, max_tokens=max_tokens)
        check_image_count(inp=inp, upload_limits=upload_limits)
        check_text_size(inp=inp)
        admission = await completion_admit(
            principal=principal, reserve_tokens=max_tokens + prompt_token_estimate(inp)
        )
    except ApplicationError as exc:
        admission_refused(code=exc.code)
        raise
    log_context_bind(request_id=request_id, principal=principal, model=inp.model)
    # From here the request owes a settlement, whatever happens: made now, completed below.
    settlement = Settlement(
        request_id=request_id,
        caller=caller,
        admission=admission,
        model=inp.model,
        images=[],
        prompt_text="\n".join(p for p in inp.turns[-1].parts if isinstance(p, str)),
        cache_key=None,
        cache_hit=False,
    )
    verdicts: ScanVerdicts | None = None
    try:
        # 2. Validate (the scans' verdicts are read meanwhile; the answer waits for them).
        images, verdicts = await images_validate(inp=inp, limits=upload_limits)
        prompt = inference_prompt(inp=inp, images=images, max_tokens=max_tokens)
        tenant_id = str(principal.tenant_id)
        # 2b. Choose: "auto" becomes the fast or the slow model (model_choice).
        choice = model_choose(principal=principal, inp=inp, images=images)

        # 3. Cache.
        cache_key = None
        if inp.deterministic and inp.use_cache:
            cache_key = answer_cache_key(
                tenant_id=tenant_id,
                model=choice.model,
                messages=prompt.messages,
                sampling=prompt.sampling,
            )
        cached = await answer_cache_lookup(key=cache_key) if cache_key else None

        client = get_inference_client()
        model = choice.model
        inference_request = None
        if cached is None:
            # 4. Route (a routed request's slow model degrades to its fast one).
            model = await model_route(
                client=client, model=choice.model, fallback=choice.fallback or limits.fallback_model
            )
            # 5. Submit.
            inference_request = await completion_submit(
                client=client,
                request_id=request_id,
                tenant_id=tenant_id,
                model=model,
                prompt=prompt,
                images=images,
                stream=inp.stream,
            )
    except BaseException as exc:
        # Nothing was generated: the admission goes back untouched (settling an error or a
        # cancellation with no tokens seen charges nothing) and the usage record says why.
        # Redis down or hung while routing or submitting is a 503; an image the scan
        # refused is the error still, as when its verdict came before the enqueue.
        error = store_unavailable_error() if isinstance(exc, STORE_OUTAGES) else exc
        if verdicts is not None:
            error = await _scan_refusal_or(error, verdicts)
        await asyncio.shield(settlement.settle_refused(error))
        if error is exc:
            raise
        raise error from exc

    # 6 and 7: the run streams and settles.
    settlement.model = model
    settlement.images = list(images.values())
    # Stored only for the model asked for (a fallback's answer must not stand in for the
    # model's), and never again when it came from the cache.
    settlement.cache_key = cache_key if cached is None and model == choice.model else None
    settlement.cache_hit = cached is not None
    settlement.route_rule = choice.rule
    run = CompletionRun(
        request_id=request_id,
        model=model,
        requested_model=choice.model,
        created=int(time.time()),
        input=inp,
        images=settlement.images,
        client=client,
        inference_request=inference_request,
        cached=cached,
        settlement=settlement,
        route_rule=choice.rule,
        verdicts=verdicts,
    )
    if inference_request is not None and choice.escalation and model == choice.model:
        run.events_source = escalating_source(run=run, choice=choice)
    return run


async def _scan_refusal_or(error: BaseException, verdicts: ScanVerdicts) -> BaseException:
    """The scans' refusal when an image has one, else ``error``; a request cancelled (the
    client went away) does not wait for the verdicts (they are still read, and logged)."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return error
    try:
        refusal = await verdicts.refusal()
    except asyncio.CancelledError as cancelled:  # the client went away meanwhile
        return cancelled
    except Exception:  # not a verdict: the request's own error still stands
        logger.exception("reading the scan verdicts after an error failed")
        return error
    return error if refusal is None else refusal
