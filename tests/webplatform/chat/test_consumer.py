"""The websocket chat (``webplatform.chat.consumers.ChatConsumer``) through the whole ASGI
stack (``webplatform.asgi.application``: origin check, sessions, routing), driven by
Channels' ``WebsocketCommunicator``, answered by the real tiny model in-process.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace

import pytest
import redis
from channels.db import database_sync_to_async

from inference.protocol import NOTICE_MESSAGES, TAKEN_OVER, new_request_id
from tenants.models import ApiKey, Membership, UsageRecord
from tenants.selectors.tenants import member_principal_get, tenant_limits_get
from tenants.services.api_keys import api_key_authenticate, api_key_revoke
from tenants.services.quotas import quota_status
from tests.factories import api_key_for
from tests.webplatform.chat.support import (
    LONG_PROMPT,
    MODEL,
    answer_text,
    assert_streamed_answer,
    frames_until_end,
    image_message,
    png_data_uri,
    settled_usage_record,
    wait_for,
)
from tests.webplatform.notice_client import TakenOverClient
from webplatform.completions.answer import Answer
from webplatform.completions.pipeline import chat_completion_start
from webplatform.completions.request import Caller, EntryPoint
from webplatform.completions.serializers import MessageFrameSerializer
from webplatform.models import Conversation, ConversationTurn

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("chat_inference")]

ALLOWED_ORIGIN = "http://testserver"


@pytest.fixture
def engines(chat_inference):
    """The engines of this module's shared in-process client (``paced`` slows them)."""
    return chat_inference


async def greedy_answer(raw_key: str, content, *, max_tokens: int) -> Answer:
    """The same question answered without streaming, greedy, bypassing the answer cache."""
    principal = await database_sync_to_async(api_key_authenticate)(raw_key=raw_key)
    frame = MessageFrameSerializer(
        data={"type": "message", "content": content, "max_tokens": max_tokens, "temperature": 0}
    )
    assert frame.is_valid(), frame.errors
    inp = replace(frame.to_input(history=(), default_model=MODEL), stream=False, use_cache=False)
    run = await chat_completion_start(
        caller=Caller(principal=principal, entry_point=EntryPoint.REST),
        inp=inp,
        request_id=new_request_id(),
    )
    items = [item async for item in run.events()]
    assert isinstance(items[-1], Answer)
    return items[-1]


# --- streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("Describe the weather in the park.", id="text"),
        pytest.param(image_message("What is in the picture?", png_data_uri()), id="image"),
    ],
)
async def test_a_message_streams_start_deltas_and_done_equal_to_the_greedy_answer(
    connect_chat, owner_key, content
):
    chat = await connect_chat(key=owner_key)
    ready = await chat.receive()
    assert ready == {"type": "ready", "conversation_id": None, "models": [MODEL]}

    frames = await chat.ask(content, temperature=0, max_tokens=40)

    done = assert_streamed_answer(frames)
    assert done["finish_reason"] in ("stop", "length")
    assert done["cache_hit"] is False
    usage = done["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if isinstance(content, list):
        assert usage["image_tokens"] > 0
    reference = await greedy_answer(owner_key, content, max_tokens=40)
    assert answer_text(frames) == reference.text
    assert usage["completion_tokens"] == reference.usage.completion_tokens
    record = await settled_usage_record(done["request_id"])
    assert (record.status, record.channel) == ("ok", "websocket")


async def test_the_same_connection_answers_again_after_done(connect_chat, owner_key):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    first = await chat.ask("Hello!", max_tokens=8)
    second = await chat.ask("And again?", max_tokens=8)
    assert_streamed_answer(first)
    assert_streamed_answer(second)
    assert first[-1]["conversation_id"] == second[-1]["conversation_id"] is not None


async def test_a_takeover_notice_is_a_frame_before_the_text(connect_chat, owner_key, monkeypatch):
    """The request's worker died and another took it over: the chat says so, then answers."""
    from webplatform.completions import pipeline

    taken_over = TakenOverClient(pipeline.get_inference_client())
    monkeypatch.setattr(pipeline, "get_inference_client", lambda: taken_over)
    chat = await connect_chat(key=owner_key)
    await chat.receive()

    frames = await chat.ask("Hello!", max_tokens=8)

    assert [f["type"] for f in frames[:2]] == ["start", "notice"]
    assert frames[1] == {
        "type": "notice",
        "code": TAKEN_OVER,
        "message": NOTICE_MESSAGES[TAKEN_OVER],
    }
    assert_streamed_answer([frames[0], *frames[2:]])


# --- cancel and disconnect ------------------------------------------------------------------


async def test_cancel_ends_the_answer_and_frees_the_engine_slot(connect_chat, owner_key, paced):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    await chat.send(
        {"type": "message", "content": LONG_PROMPT, "max_tokens": 2000, "temperature": 0}
    )
    start = await chat.receive()
    assert start["type"] == "start"
    assert (await chat.receive())["type"] == "delta"
    assert paced.running == 1

    await chat.send({"type": "cancel"})
    frames = await frames_until_end(chat.receive, timeout_s=3.0)

    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < 40  # stopped early, not run to the end
    assert done["conversation_id"] is None  # a cancelled answer is not remembered
    assert await paced.wait_idle() == 0
    record = await settled_usage_record(start["request_id"])
    assert record.status == "cancelled"
    # The connection still serves the next message.
    paced.pace(0)
    assert_streamed_answer(await chat.ask("Hello!", max_tokens=5))


async def test_client_disconnect_mid_stream_cancels_the_request_in_the_worker(
    connect_chat, owner_key, paced
):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    await chat.send(
        {"type": "message", "content": LONG_PROMPT, "max_tokens": 2000, "temperature": 0}
    )
    start = await chat.receive()
    assert (await chat.receive())["type"] == "delta"
    assert paced.running == 1

    await chat.close()

    assert await paced.wait_idle() == 0
    record = await settled_usage_record(start["request_id"])
    assert record is not None and record.status == "cancelled"
    assert not await database_sync_to_async(Conversation.objects.exists)()


# --- authentication ---------------------------------------------------------------------


async def _ready(chat) -> dict:
    frame = await chat.receive()
    assert frame["type"] == "ready", frame
    return frame


async def _refused(chat) -> tuple[str, int]:
    frame = await chat.receive()
    assert frame["type"] == "error", frame
    return frame["code"], await chat.closed_with()


async def test_connections_without_valid_credentials_are_refused(connect_chat, owner, owner_key):
    revoked = await database_sync_to_async(api_key_for)(owner.tenant, name="revoked")
    await database_sync_to_async(api_key_revoke)(api_key=revoked.api_key)
    read_only = await database_sync_to_async(api_key_for)(
        owner.tenant, name="read only", access=ApiKey.Access.READ
    )
    cases = [
        ({}, ("invalid_api_key", 4401)),
        ({"key": owner_key[:-4] + "AAAA"}, ("invalid_api_key", 4401)),
        ({"key": "not a key"}, ("invalid_api_key", 4401)),
        ({"key": revoked.raw_key}, ("api_key_revoked", 4401)),
        # A read-only key may only read (GET endpoints); chatting writes usage and history.
        ({"key": read_only.raw_key}, ("insufficient_permissions", 4403)),
    ]
    for credentials, refusal in cases:
        chat = await connect_chat(**credentials)
        assert await _refused(chat) == refusal, credentials


async def test_a_key_revoked_while_the_socket_is_open_stops_working(connect_chat, owner):
    issued = await database_sync_to_async(api_key_for)(owner.tenant, name="revoked later")
    chat = await connect_chat(key=issued.raw_key)
    assert (await chat.receive())["type"] == "ready"
    assert_streamed_answer(await chat.ask("Hello!", max_tokens=4))

    await database_sync_to_async(api_key_revoke)(api_key=issued.api_key)
    frames = await chat.ask("Still there?", max_tokens=4)

    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["code"] == "api_key_revoked"
    assert await chat.closed_with() == 4401


async def test_a_key_revoked_while_its_answer_streams_stops_it_within_a_second(
    connect_chat, owner, paced
):
    issued = await database_sync_to_async(api_key_for)(owner.tenant, name="revoked mid-answer")
    chat = await connect_chat(key=issued.raw_key)
    assert (await chat.receive())["type"] == "ready"
    await chat.send(
        {"type": "message", "content": LONG_PROMPT, "max_tokens": 2000, "temperature": 0}
    )
    start = await chat.receive()
    assert start["type"] == "start"
    assert (await chat.receive())["type"] == "delta"

    await database_sync_to_async(api_key_revoke)(api_key=issued.api_key)
    revoked_at = time.monotonic()
    frames = await frames_until_end(chat.receive, timeout_s=3.0)
    stopped_after = time.monotonic() - revoked_at

    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "api_key_revoked"
    assert stopped_after < 1.0
    assert len(frames) - 1 < 25  # deltas already on their way at 40 ms a step, no more
    assert await chat.closed_with() == 4401
    assert await paced.wait_idle() == 0  # the worker stopped generating
    record = await settled_usage_record(start["request_id"])
    assert record.status == "cancelled"


@database_sync_to_async
def _issue_ticket(raw_key: str) -> str:
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    response = client.post("/v1/chat/tickets")
    assert response.status_code == 201, response.content
    return response.json()["ticket"]


async def test_a_ticket_opens_one_connection_only(connect_chat, owner_key):
    ticket = await _issue_ticket(owner_key)

    first = await connect_chat(f"ticket={ticket}")
    await _ready(first)
    assert_streamed_answer(await first.ask("Hi", max_tokens=4))
    second = await connect_chat(f"ticket={ticket}")

    assert await _refused(second) == ("invalid_ticket", 4401)


async def test_a_cross_site_origin_is_refused_at_the_handshake(
    connect_chat, owner, owner_key, session_cookie
):
    cookie = await database_sync_to_async(session_cookie)(owner.user)
    query = f"tenant={owner.tenant.pk}"
    for origin in ("https://evil.example", "http://testserver.evil.example", "null"):
        await connect_chat(query, cookie=cookie, origin=origin, expect_accept=False)
        # A page cannot attach a Bearer header, but the check holds for any credentials.
        await connect_chat(query, key=owner_key, origin=origin, expect_accept=False)


async def test_a_session_without_origin_is_not_enough(connect_chat, owner, session_cookie):
    """Programs (no Origin) must use a key or a ticket: a stolen cookie alone opens nothing."""
    cookie = await database_sync_to_async(session_cookie)(owner.user)
    chat = await connect_chat(f"tenant={owner.tenant.pk}", cookie=cookie)
    assert await _refused(chat) == ("invalid_api_key", 4401)


async def test_a_session_with_an_allowed_origin_chats_in_the_playground(
    connect_chat, owner, session_cookie
):
    cookie = await database_sync_to_async(session_cookie)(owner.user)
    chat = await connect_chat(f"tenant={owner.tenant.pk}", cookie=cookie, origin=ALLOWED_ORIGIN)
    await _ready(chat)

    done = assert_streamed_answer(await chat.ask("Hello!", max_tokens=6))

    record = await settled_usage_record(done["request_id"])
    assert record.channel == "playground"
    assert (record.tenant_id, record.user_id, record.api_key_id) == (
        owner.tenant.pk,
        owner.user.pk,
        None,
    )


async def test_a_session_for_another_tenant_is_refused(
    connect_chat, owner, outsider, session_cookie
):
    cookie = await database_sync_to_async(session_cookie)(owner.user)
    for tenant in (outsider.tenant.pk, 999_999, "acme", ""):
        chat = await connect_chat(f"tenant={tenant}", cookie=cookie, origin=ALLOWED_ORIGIN)
        expected = ("invalid_api_key", 4401) if tenant == "" else ("insufficient_permissions", 4403)
        assert await _refused(chat) == expected, tenant


# --- conversations --------------------------------------------------------------------------


async def test_a_conversation_is_only_reopened_by_its_owner(
    connect_chat, owner, owner_key, outsider_key, session_cookie
):
    question = "What colour is the cat?"
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    first = await chat.ask(question, temperature=0, max_tokens=12)
    conversation_id = assert_streamed_answer(first)["conversation_id"]
    assert conversation_id
    await chat.close()

    # Another tenant's key, the same tenant's other key, a member's session: not theirs.
    other_key = (await database_sync_to_async(api_key_for)(owner.tenant, name="second")).raw_key
    cookie = await database_sync_to_async(session_cookie)(owner.user)
    for options in (
        {"key": outsider_key},
        {"key": other_key},
        {"cookie": cookie, "origin": ALLOWED_ORIGIN},
    ):
        query = f"conversation={conversation_id}&tenant={owner.tenant.pk}"
        intruder = await connect_chat(query, **options)
        assert await _refused(intruder) == ("conversation_not_found", 4404), options

    # The owner reopens it and the history is part of the prompt.
    again = await connect_chat(f"conversation={conversation_id}", key=owner_key)
    assert (await again.receive())["conversation_id"] == conversation_id
    second = await again.ask(question, temperature=0, max_tokens=12)
    done = assert_streamed_answer(second)
    assert done["conversation_id"] == conversation_id
    assert done["usage"]["prompt_tokens"] > first[-1]["usage"]["prompt_tokens"]
    roles = await database_sync_to_async(
        lambda: list(
            ConversationTurn.objects.filter(conversation_id=conversation_id).values_list(
                "role", flat=True
            )
        )
    )()
    assert roles == ["user", "assistant", "user", "assistant"]


async def test_an_unknown_conversation_is_not_found(connect_chat, owner_key):
    for conversation_id in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        chat = await connect_chat(f"conversation={conversation_id}", key=owner_key)
        assert await _refused(chat) == ("conversation_not_found", 4404), conversation_id


async def test_images_of_earlier_turns_stay_in_the_conversation(connect_chat, owner_key):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    first = await chat.ask(image_message("What is this?", png_data_uri()), max_tokens=4)
    image_tokens = assert_streamed_answer(first)["usage"]["image_tokens"]
    assert image_tokens > 0

    second = assert_streamed_answer(await chat.ask("And its colour?", max_tokens=4))

    assert second["usage"]["image_tokens"] == image_tokens


# --- bad frames -----------------------------------------------------------------------------


BAD_FRAMES = [
    ({"type": "bogus"}, "invalid_frame", None),
    (["message"], "invalid_frame", None),
    ({"type": "message"}, "invalid_request", "messages[0].content"),
    ({"type": "message", "content": "hi", "temperature": 5}, "invalid_request", "temperature"),
    ({"type": "message", "content": "hi", "max_tokens": 0}, "invalid_request", "max_tokens"),
    ({"type": "message", "content": "hi", "max_tokens": 2.5}, "invalid_request", "max_tokens"),
    ({"type": "message", "content": "hi", "top_p": 1.5}, "invalid_request", "top_p"),
    ({"type": "message", "content": "hi", "top_p": "x"}, "invalid_request", "top_p"),
    ({"type": "message", "content": "hi", "seed": "x"}, "invalid_request", "seed"),
    ({"type": "message", "content": "hi", "model": "gpt-9"}, "model_not_found", "model"),
    (
        {"type": "message", "content": "hi", "max_tokens": 10**5},
        "max_tokens_too_large",
        "max_tokens",
    ),
]


async def test_bad_frames_get_errors_and_the_connection_stays_usable(connect_chat, owner_key):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    for frame, code, param in BAD_FRAMES:
        await chat.send(frame)
        error = await chat.receive()
        assert (error["type"], error["code"], error["param"]) == ("error", code, param), frame
        assert error["message"]
    assert_streamed_answer(await chat.ask("Still there?", max_tokens=4))


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"plain text, no image").decode()
BAD_IMAGES = [
    (NOT_AN_IMAGE, "unsupported_image_type"),
    ("data:image/png;base64,%%%not-base64%%%", "invalid_image_data"),
    ("https://example.com/cat.png", "image_url_not_allowed"),
]


async def test_bad_images_get_the_upload_error_and_the_connection_stays_usable(
    connect_chat, owner_key
):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    for url, code in BAD_IMAGES:
        await chat.send({"type": "message", "content": image_message("What is it?", url)})
        error = await chat.receive()
        assert (error["type"], error["code"]) == ("error", code), url
        assert error["param"] == "messages[0].content[0].image_url"

    done = assert_streamed_answer(
        await chat.ask(image_message("And this?", png_data_uri()), max_tokens=4)
    )
    assert done["usage"]["image_tokens"] > 0


async def test_a_cancel_right_after_the_message_still_ends_in_done(connect_chat, owner_key):
    """A cancel that arrives before ``start`` (the request is still being admitted) is not
    lost: the answer ends at once, cancelled, instead of running to its end."""
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    await chat.send(
        {"type": "message", "content": LONG_PROMPT, "max_tokens": 2000, "temperature": 0}
    )
    await chat.send({"type": "cancel"})

    frames = await frames_until_end(chat.receive, timeout_s=10.0)

    assert [f["type"] for f in frames] == ["start", "done"]
    assert frames[-1]["finish_reason"] == "cancelled"
    assert frames[-1]["usage"]["completion_tokens"] == 0


async def test_text_that_is_not_json_gets_invalid_frame(connect_chat, owner_key):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    await chat.communicator.send_to(text_data="this is not json")
    assert (await chat.receive())["code"] == "invalid_frame"
    await chat.communicator.send_to(bytes_data=b"\x00\x01")
    assert (await chat.receive())["code"] == "invalid_frame"
    assert_streamed_answer(await chat.ask("Still there?", max_tokens=4))


async def test_hostile_frames_get_errors_not_a_crash(connect_chat, owner_key):
    """The same strict parser and schema as the REST body (docs/reliability.md)."""
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    frames = [
        '{"type": "message", "content": "hi \\ud800"}',  # an escaped lone surrogate
        '{"type": "message", "content": "hi \ud800"}',  # a raw one in the frame's text
        '{"type": "message", "content": "hi", "temperature": NaN}',
        '{"type": "message", "content": ' + "[" * 10_000 + "]" * 10_000 + "}",
    ]
    for text in frames:
        await chat.communicator.send_to(text_data=text)
        assert (await chat.receive())["code"] == "invalid_frame", text
    await chat.send({"type": "message", "content": "hi", "seed": 2**70})
    error = await chat.receive()
    assert (error["type"], error["param"]) == ("error", "seed")
    assert_streamed_answer(await chat.ask("Still there?", max_tokens=4))


async def test_a_second_message_while_streaming_is_refused(connect_chat, owner_key, paced):
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    await chat.send(
        {"type": "message", "content": LONG_PROMPT, "max_tokens": 2000, "temperature": 0}
    )
    assert (await chat.receive())["type"] == "start"
    assert (await chat.receive())["type"] == "delta"

    await chat.send({"type": "message", "content": "Me too!"})

    frames = []
    while not any(f["type"] == "error" for f in frames):
        frames.append(await chat.receive())
    assert frames[-1]["code"] == "request_in_progress"
    assert all(f["type"] == "delta" for f in frames[:-1])  # the first answer goes on
    assert paced.running == 1  # and only the first one reached the engine
    await chat.send({"type": "cancel"})
    rest = await frames_until_end(chat.receive, timeout_s=3.0)
    assert rest[-1]["finish_reason"] == "cancelled"


# --- credentials that go away, admissions that must not leak --------------------------------


async def test_a_member_removed_while_the_socket_is_open_stops_working(
    connect_chat, owner, teammate, session_cookie
):
    """A session principal is checked again for every message, as a key is: someone removed
    from the organisation cannot go on spending its quota over a socket opened before."""
    cookie = await database_sync_to_async(session_cookie)(teammate.user)
    chat = await connect_chat(f"tenant={teammate.tenant.pk}", cookie=cookie, origin=ALLOWED_ORIGIN)
    await _ready(chat)
    assert_streamed_answer(await chat.ask("Hello!", max_tokens=4))

    await database_sync_to_async(Membership.objects.filter(pk=teammate.membership.pk).delete)()
    frames = await chat.ask("Still there?", max_tokens=4)

    assert [f["type"] for f in frames] == ["error"]
    assert frames[0]["code"] == "insufficient_permissions"
    assert await chat.closed_with() == 4403


async def test_a_ticket_of_a_deleted_member_is_refused_not_a_crash(connect_chat, owner):
    from webplatform.chat.tickets import chat_ticket_issue

    principal = await database_sync_to_async(member_principal_get)(
        tenant=owner.tenant, user=owner.user
    )
    ticket, _ = await database_sync_to_async(chat_ticket_issue)(principal=principal)
    await database_sync_to_async(type(owner.user).objects.filter(pk=owner.user.pk).delete)()

    chat = await connect_chat(f"ticket={ticket}")
    assert await _refused(chat) == ("invalid_ticket", 4401)


async def test_a_request_cancelled_while_its_start_frame_is_sent_is_settled(
    connect_chat, owner, owner_key, monkeypatch
):
    """The task can be cancelled (client gone) while the ``start`` frame is sent, which goes
    with the stream's first event (after the images' scan verdicts): the run must still be
    settled, or its concurrency lease and its reserved tokens stay taken; it is charged
    what it consumed, as any cancelled request."""
    from webplatform.chat.consumers import ChatConsumer

    real_send_json = ChatConsumer.send_json

    async def send_json(self, content, close=False):
        if content.get("type") == "start":
            raise asyncio.CancelledError  # as if disconnect() cancelled the task here
        return await real_send_json(self, content, close)

    monkeypatch.setattr(ChatConsumer, "send_json", send_json)
    chat = await connect_chat(key=owner_key)
    await chat.receive()
    await chat.send({"type": "message", "content": "Hello!", "max_tokens": 64})

    record = await wait_for(
        database_sync_to_async(UsageRecord.objects.filter(tenant=owner.tenant).first)
    )
    assert record is not None and record.status == "cancelled"

    def quota_of_owner():
        tenant = type(owner.tenant).objects.select_related("plan").get(pk=owner.tenant.pk)
        return quota_status(tenant_id=tenant.pk, limits=tenant_limits_get(tenant=tenant))

    status = await database_sync_to_async(quota_of_owner)()
    assert status.in_flight == 0
    assert status.limit_tokens - status.remaining_tokens == (
        record.prompt_tokens + record.completion_tokens
    )  # what it consumed, not its reservation (64 + the prompt's estimate)


# --- Redis outages ----------------------------------------------------------------------------


class _DownCache:
    """A cache whose every call fails as redis-py does when Redis is down."""

    def __getattr__(self, name: str):
        def down(*args, **kwargs):
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379.")

        return down


async def test_redis_down_while_a_connection_authenticates_is_a_retry_later(
    connect_chat, owner_key, monkeypatch
):
    from tenants.services import api_keys

    monkeypatch.setattr(api_keys, "cache", _DownCache())
    chat = await connect_chat(key=owner_key)

    frame = await chat.receive()

    assert frame["type"] == "error" and frame["code"] == "service_unavailable", frame
    assert await chat.closed_with() == 1013  # Try Again Later, not a crash (1011)


async def test_redis_down_during_a_message_refuses_it_and_keeps_the_connection(
    connect_chat, owner_key, monkeypatch
):
    from tenants.services import api_keys

    chat = await connect_chat(key=owner_key)
    await chat.receive()
    working = api_keys.cache
    monkeypatch.setattr(api_keys, "cache", _DownCache())

    refused = await chat.ask("Hello!", max_tokens=8)

    assert [f["type"] for f in refused] == ["error"]
    assert refused[0]["code"] == "service_unavailable"
    monkeypatch.setattr(api_keys, "cache", working)
    assert_streamed_answer(await chat.ask("Hello again!", max_tokens=8))
