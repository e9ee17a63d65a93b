"""Websocket chat at ``/ws/chat/``: streams answers as frames, keeps history server-side.

Authentication, in order: ``Authorization: Bearer <key>`` on the handshake (programs), a
single-use ``?ticket=`` from ``POST /v1/chat/tickets`` (browsers calling with a key), or the
dashboard session with ``?tenant=<id>`` (the playground; only with a checked ``Origin``).

Client frames: ``{"type": "message", "content": [OpenAI content parts] | "text",
"max_tokens"?, "temperature"?, "top_p"?, "seed"?, "model"?, "thinking"?}`` and
``{"type": "cancel"}``. Server frames: ``ready`` (conversation id), ``start``
(request id, model), ``delta`` (text, reasoning), ``done`` (finish reason, usage),
``error`` (code, message). A refused connection gets an ``error`` frame, then a close code:
4401 (no or bad credentials), 4403 (read-only key, not a member of the tenant), 4404
(``?conversation=`` that is not the caller's). A bad frame gets an ``error`` frame and the
connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from inference.protocol import FinishReason, new_request_id
from tenants.errors import ApplicationError
from tenants.outages import STORE_OUTAGES, StoreUnavailable, store_unavailable_error
from tenants.principals import ApiPrincipal
from tenants.selectors.accounts import user_get
from tenants.selectors.tenants import member_principal_get, tenant_get
from tenants.services.api_keys import (
    api_key_authenticate,
    api_key_check_not_revoked,
    api_key_principal_by_id,
)
from webplatform.chat import selectors as chat_selectors
from webplatform.chat import services as chat_services
from webplatform.chat.frames import (
    delta_frame,
    done_frame,
    error_frame,
    notice_frame,
    ready_frame,
    start_frame,
)
from webplatform.chat.tickets import chat_ticket_redeem
from webplatform.completions.answer import Answer, NoticeEvent
from webplatform.completions.json_input import json_value_parse
from webplatform.completions.pipeline import chat_completion_start
from webplatform.completions.request import Caller, ChatCompletionInput, ChatTurn, EntryPoint
from webplatform.completions.request_errors import frame_error
from webplatform.completions.serializers import MessageFrameSerializer
from webplatform.completions.streaming import CompletionRun

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455's "Try Again Later": Redis is unavailable
# While an answer streams, how often the key is checked for revocation (one cache read):
# a key revoked mid-answer stops it within this time plus a frame.
REVOCATION_POLL_SECONDS = 0.25
# What a Redis outage raises here: the store's own errors, and the API-key authentication's
# DRF-typed one (``tenants.outages``).
_OUTAGES: tuple[type[Exception], ...] = (StoreUnavailable, *STORE_OUTAGES)


def _first(query: dict[str, list[str]], name: str) -> str | None:
    """The first value of a query-string parameter, if it has one."""
    values = query.get(name)
    return values[0] if values else None


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin1")
    return None


def _member_principal(*, tenant_ref: str, user: Any) -> ApiPrincipal:
    """The member principal of ``user`` in organisation ``tenant_ref``, read afresh (plan,
    overrides, membership); 403 ``insufficient_permissions`` when it is gone."""
    tenant = tenant_get(tenant_id=int(tenant_ref)) if tenant_ref.isdigit() else None
    if tenant is None or not user.is_active:
        raise ApplicationError("No such organisation.", code="insufficient_permissions", status=403)
    return member_principal_get(tenant=tenant, user=user)


def _session_principal(scope: dict[str, Any], tenant_ref: str | None) -> ApiPrincipal | None:
    user = scope.get("user")
    if user is None or not user.is_authenticated or not tenant_ref:
        return None
    return _member_principal(tenant_ref=tenant_ref, user=user)


def _member_principal_refresh(*, tenant_id: int, user_id: Any) -> ApiPrincipal:
    user = user_get(user_id=user_id)
    if user is None:
        raise ApplicationError(
            "You are not a member of this organisation.",
            code="insufficient_permissions",
            status=403,
        )
    return _member_principal(tenant_ref=str(tenant_id), user=user)


def _invalid_frame(message: str) -> ApplicationError:
    return ApplicationError(message, code="invalid_frame")


class ChatConsumer(AsyncJsonWebsocketConsumer):
    # No groups and no channel-layer messages reach this consumer: an alias with no layer
    # configured keeps each connection from holding a blocking Redis read (channels_redis'
    # BZPOPMIN, which redis-py 8's default 5 s socket timeout turns into a crash of every
    # connection idle for 5 s). Point this at a real layer only when a feature needs one.
    channel_layer_alias = "chat-has-no-channel-layer"

    principal: ApiPrincipal
    entry_point: EntryPoint
    conversation: Any = None
    run: CompletionRun | None = None
    cancel_requested: bool = False
    task: asyncio.Task[None] | None = None
    # Set by the revocation watch before it cancels the answer's task.
    revoked: ApplicationError | None = None

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        await self.accept()
        try:
            principal, entry_point = await self._authenticate(query)
            if not principal.can_write:
                raise ApplicationError(
                    "This API key is read-only (GET endpoints only); the chat needs a key "
                    "with full access.",
                    code="insufficient_permissions",
                    status=403,
                )
        except ApplicationError as exc:
            await self.send_json(error_frame(exc))
            await self.close(code=CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_UNAUTHENTICATED)
            return
        except _OUTAGES:
            # Not the client's fault and not for long: say so and let it reconnect.
            logger.warning("websocket authentication: Redis unavailable", exc_info=True)
            await self.send_json(error_frame(store_unavailable_error()))
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return
        self.principal, self.entry_point = principal, entry_point
        conversation_id = _first(query, "conversation")
        try:
            if conversation_id:
                self.conversation = await database_sync_to_async(
                    chat_selectors.conversation_get_for_principal
                )(principal=principal, conversation_id=conversation_id)
        except ApplicationError as exc:
            await self.send_json(error_frame(exc))
            await self.close(code=CLOSE_NOT_FOUND)
            return
        await self.send_json(
            ready_frame(
                conversation_id=self._conversation_id(), models=list(principal.allowed_models)
            )
        )

    def _conversation_id(self) -> str | None:
        return str(self.conversation.pk) if self.conversation else None

    async def _authenticate(self, query: dict[str, list[str]]) -> tuple[ApiPrincipal, EntryPoint]:
        authorization = _header(self.scope, b"authorization") or ""
        if authorization.lower().startswith("bearer "):
            principal = await database_sync_to_async(api_key_authenticate)(
                raw_key=authorization[7:]
            )
            return principal, EntryPoint.WEBSOCKET
        if query.get("ticket"):
            redeemed = await database_sync_to_async(chat_ticket_redeem)(ticket=query["ticket"][0])
            if redeemed is None:
                raise ApplicationError(
                    "This ticket is unknown, used or expired.", code="invalid_ticket", status=401
                )
            return redeemed, EntryPoint.WEBSOCKET
        # The session cookie rides along on any cross-site request; only a checked Origin
        # lets it authenticate.
        if self.scope.get("browser_origin"):
            principal = await database_sync_to_async(_session_principal)(
                self.scope, _first(query, "tenant")
            )
            if principal is not None:
                return principal, EntryPoint.PLAYGROUND
        raise ApplicationError(
            "Authenticate with 'Authorization: Bearer <key>', a ticket from "
            "POST /v1/chat/tickets, or a dashboard session.",
            code="invalid_api_key",
            status=401,
        )

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        # A frame that is not JSON text is the client's mistake: answer it, stay open.
        if not hasattr(self, "principal"):
            return
        if text_data is None:
            await self.send_json(error_frame(_invalid_frame("Frames must be JSON text.")))
            return
        try:
            # Strict (webplatform/completions/json_input.py): UTF-8 without lone surrogates,
            # no NaN, nested at most REQUEST_JSON_MAX_DEPTH levels.
            content = json_value_parse(text_data, max_depth=settings.REQUEST_JSON_MAX_DEPTH)
        except ApplicationError:
            await self.send_json(error_frame(_invalid_frame("This frame is not valid JSON.")))
            return
        await self.receive_json(content, **kwargs)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not hasattr(self, "principal"):
            return
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "cancel":
            # Before ``start`` there is no run to cancel yet: ``_answer`` cancels it as
            # soon as it exists, so a quick cancel still ends in ``done`` "cancelled".
            self.cancel_requested = True
            if self.run is not None:
                await self.run.cancel()
            return
        if kind != "message":
            await self.send_json(error_frame(_invalid_frame("Unknown frame type.")))
            return
        if self.task is not None and not self.task.done():
            await self.send_json(
                error_frame(
                    ApplicationError(
                        "A request is already streaming on this connection; cancel it first.",
                        code="request_in_progress",
                    )
                )
            )
            return
        self.cancel_requested = False
        self.task = asyncio.create_task(self._answer(content))

    async def _history(self) -> tuple[ChatTurn, ...]:
        if self.conversation is None:
            return ()
        return await database_sync_to_async(chat_selectors.conversation_history)(
            conversation=self.conversation
        )

    def _input(self, frame: dict[str, Any], history: tuple[ChatTurn, ...]) -> ChatCompletionInput:
        serializer = MessageFrameSerializer(data=frame)
        if not serializer.is_valid():
            raise frame_error(serializer.errors, message_index=len(history))
        default_model = (
            self.conversation.model if self.conversation else self.principal.default_model
        )
        return serializer.to_input(history=history, default_model=default_model or "")

    async def _principal_still_valid(self) -> None:
        """Credentials that stop being valid while the socket is open stop working at once:
        a key revoked or expired, a member removed from the organisation (or the
        organisation deleted). Read afresh, so a plan change applies from the next message.
        """
        if self.principal.api_key is not None:
            self.principal = await database_sync_to_async(api_key_principal_by_id)(
                api_key_id=self.principal.api_key.pk
            )
        elif self.principal.user is not None:
            self.principal = await database_sync_to_async(_member_principal_refresh)(
                tenant_id=self.principal.tenant_id, user_id=self.principal.user.pk
            )

    async def _watch_revocation(self, answer_task: asyncio.Task[None]) -> None:
        """While an answer streams for a key, poll the key's revocation marker; once it is
        revoked (or expired), stop the answer: its task is cancelled, which cancels the
        request in the worker and settles it, and ``_answer`` tells the client."""
        api_key = self.principal.api_key
        if api_key is None:
            return
        while not answer_task.done():
            await asyncio.sleep(REVOCATION_POLL_SECONDS)
            try:
                await database_sync_to_async(api_key_check_not_revoked)(api_key=api_key)
            except ApplicationError as exc:
                self.revoked = exc
                answer_task.cancel()
                return
            except _OUTAGES:
                # The answer needs Redis too and reports its own failure; look again later.
                logger.warning("revocation watch: Redis unavailable", exc_info=True)

    async def _answer(self, frame: dict[str, Any]) -> None:
        try:
            await self._principal_still_valid()
        except ApplicationError as exc:
            await self.send_json(error_frame(exc))
            await self.close(code=CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_UNAUTHENTICATED)
            return
        except _OUTAGES:
            # This message is refused; the connection stays for the next one.
            logger.warning("websocket message: Redis unavailable", exc_info=True)
            await self.send_json(error_frame(store_unavailable_error()))
            return
        current = asyncio.current_task()
        assert current is not None
        self.revoked = None
        watch = asyncio.create_task(self._watch_revocation(current))
        try:
            await self._answer_frame(frame)
        except asyncio.CancelledError:
            if self.revoked is None:
                raise  # the client went away or the connection is closing
            # The key was revoked mid-answer: the stream is closed and settled; say why.
            current.uncancel()
            await self.send_json(error_frame(self.revoked))
            await self.close(code=CLOSE_UNAUTHENTICATED)
        finally:
            watch.cancel()

    async def _answer_frame(self, frame: dict[str, Any]) -> None:
        run: CompletionRun | None = None
        try:
            history = await self._history()
            inp = self._input(frame, history)
            self.run = run = await chat_completion_start(
                caller=Caller(principal=self.principal, entry_point=self.entry_point),
                inp=inp,
                request_id=new_request_id(),
            )
            if self.cancel_requested:
                await run.cancel()
            answer: Answer | None = None
            started = False
            # aclosing: a cancel that lands while a frame is being sent closes (and so
            # settles) the stream now, not whenever the generator is garbage-collected.
            async with contextlib.aclosing(run.events()) as events:
                async for event in events:
                    if not started:
                        # With the first event: the images' scan verdicts are in by then
                        # (CompletionRun.events), so a refused image gets an error frame
                        # alone, never a start.
                        await self.send_json(
                            start_frame(request_id=run.request_id, model=run.model)
                        )
                        started = True
                    if isinstance(event, Answer):
                        answer = event
                    elif isinstance(event, NoticeEvent):
                        await self.send_json(notice_frame(event))
                    else:
                        await self.send_json(delta_frame(event))
            assert answer is not None
            await self._remember(inp, run, answer)
            await self.send_json(
                done_frame(
                    answer,
                    request_id=run.request_id,
                    cache_hit=run.cache_hit,
                    conversation_id=self._conversation_id(),
                )
            )
        except ApplicationError as exc:
            await self.send_json(error_frame(exc))
            if exc.status == 401:
                await self.close(code=CLOSE_UNAUTHENTICATED)
        except _OUTAGES:
            logger.warning("websocket request: Redis unavailable", exc_info=True)
            await self.send_json(error_frame(store_unavailable_error()))
        except Exception:
            logger.exception("websocket request failed")
            await self.send_json(
                error_frame(ApplicationError("Internal error.", code="internal_error", status=500))
            )
        finally:
            self.run = None
            if run is not None:
                # Settles a run whose stream never started or was cut short (the task was
                # cancelled between admission and the first event): without it the quota
                # lease and the day's token reservation would stay taken. A no-op otherwise.
                await run.abandon()

    async def _remember(self, inp: ChatCompletionInput, run: CompletionRun, answer: Answer) -> None:
        if answer.finish_reason is FinishReason.CANCELLED:
            return
        if self.conversation is None:
            self.conversation = await database_sync_to_async(chat_services.conversation_create)(
                # The model asked for: "auto" stays routed turn by turn.
                principal=self.principal,
                model=run.input.model,
            )
        new_turn = inp.turns[-1]
        await database_sync_to_async(chat_services.conversation_turns_append)(
            conversation=self.conversation,
            user_text="".join(p for p in new_turn.parts if isinstance(p, str)),
            user_images=[
                {"sha256": i.sha256, "width": i.width, "height": i.height} for i in run.images
            ],
            assistant_text=answer.text,
        )

    async def disconnect(self, code: int) -> None:
        # The client went away: stop its request in the worker and settle it.
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
