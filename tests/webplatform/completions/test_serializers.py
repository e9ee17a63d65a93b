"""The one chat request schema (``webplatform.completions.serializers``): what the REST body
and a websocket ``message`` frame accept, and the error each refusal is told with."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework import serializers

from tenants.errors import ApplicationError
from webplatform.completions.request import ChatCompletionInput, ChatTurn, ImageSource
from webplatform.completions.request_errors import chat_request_error, frame_error
from webplatform.completions.serializers import (
    ChatCompletionRequestSerializer,
    MessageFrameSerializer,
)

IMAGE = "data:image/png;base64,AAAA"


def rest(body: Any, **options: Any) -> ChatCompletionInput:
    serializer = ChatCompletionRequestSerializer(data=body)
    if not serializer.is_valid():
        raise chat_request_error(serializer.errors)
    return serializer.to_input(default_model="m", **options)


def frame(history: tuple[ChatTurn, ...] = (), **fields: Any) -> ChatCompletionInput:
    serializer = MessageFrameSerializer(data={"type": "message", **fields})
    if not serializer.is_valid():
        raise frame_error(serializer.errors, message_index=len(history))
    return serializer.to_input(history=history, default_model="m")


def refusal(call: Any, *args: Any, **kwargs: Any) -> tuple[str, str, str | None]:
    with pytest.raises(ApplicationError) as caught:
        call(*args, **kwargs)
    return caught.value.code, caught.value.message, caught.value.param


def user(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


# --- what is accepted -------------------------------------------------------------------------


def test_the_openai_form_becomes_turns_with_each_image_named_by_its_field() -> None:
    inp = rest(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "assistant", "content": None},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                },
            ]
        }
    )

    assert inp.turns == (
        ChatTurn(role="system", parts=("Be brief.",)),
        ChatTurn(role="assistant", parts=("",)),
        ChatTurn(
            role="user",
            parts=(
                ImageSource(url=IMAGE, param="messages[2].content[0].image_url", detail="low"),
                "What is it?",
            ),
        ),
    )
    assert inp.model == "m"


def test_the_simple_form_is_one_user_turn() -> None:
    inp = rest({"prompt": "Read it.", "image": IMAGE})

    assert inp.turns == (
        ChatTurn(role="user", parts=(ImageSource(url=IMAGE, param="image"), "Read it.")),
    )


def test_options_are_normalised_the_same_way_for_both_entry_points() -> None:
    options = {"temperature": None, "top_p": 0, "thinking": {"type": "enabled"}, "seed": 7}

    for inp in (rest({**user("hi"), **options}), frame(content="hi", **options)):
        assert (inp.temperature, inp.top_p, inp.thinking, inp.seed) == (1.0, 1e-6, True, 7)


def test_rest_only_fields() -> None:
    inp = rest(
        {
            **user("hi"),
            "max_tokens": 9,
            "max_completion_tokens": 5,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "cache": False,
        }
    )

    assert (inp.max_tokens, inp.stop, inp.stream, inp.include_usage) == (5, ("END",), True, True)
    assert inp.use_cache is False
    assert rest(user("hi"), use_cache=False).use_cache is False  # Cache-Control: no-store


def test_a_frame_continues_the_conversation_and_numbers_its_message_after_the_history() -> None:
    history = (ChatTurn(role="user", parts=("a",)), ChatTurn(role="assistant", parts=("b",)))

    inp = frame(history, content=[{"type": "image_url", "image_url": IMAGE}], model=0)

    assert inp.turns[:2] == history
    assert inp.turns[2].parts == (ImageSource(url=IMAGE, param="messages[2].content[0].image_url"),)
    assert (inp.model, inp.stream) == ("m", True)  # a false model means the default one


# --- what is refused, and how it is told --------------------------------------------------------

REST_REFUSALS = [
    ({}, "Provide 'messages' (or the simple form 'prompt' with 'image').", "messages"),
    ({"messages": []}, "messages must be a non-empty list.", "messages"),
    ({"messages": ["hi"]}, "Each message must be an object.", "messages[0]"),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        "Unsupported role 'tool'; use system, user or assistant.",
        "messages[0].role",
    ),
    (
        {"messages": [{"role": ["user"], "content": "x"}]},
        "Unsupported role ['user']; use system, user or assistant.",
        "messages[0].role",
    ),
    (user([]), "content must be a string or a non-empty list of parts.", "messages[0].content"),
    (user(None), "content must be a string or a non-empty list of parts.", "messages[0].content"),
    (user(["x"]), "Each content part must be an object.", "messages[0].content[0]"),
    (
        user([{"type": "text", "text": 5}]),
        "A text part needs a string 'text'.",
        "messages[0].content[0].text",
    ),
    (
        user([{"type": "image_url", "image_url": {"detail": "low"}}]),
        "An image_url part needs 'image_url.url' (a data URI).",
        "messages[0].content[0].image_url",
    ),
    (
        user([{"type": "image_url", "image_url": {"url": IMAGE, "detail": "huge"}}]),
        "detail must be one of auto, low, high.",
        "messages[0].content[0].image_url.detail",
    ),
    (
        user([{"type": "audio"}]),
        "Unsupported content part type 'audio'; use 'text' or 'image_url'.",
        "messages[0].content[0].type",
    ),
    (
        {
            "messages": [
                {"role": "system", "content": [{"type": "image_url"}]},
                {"role": "user", "content": "x"},
            ]
        },
        "Only user messages may carry images.",
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "The last message must come from the user.",
        "messages",
    ),
    (
        {**user("x"), "stop": ["a", ""]},
        "stop must be a string or a list of up to 4 non-empty strings.",
        "stop",
    ),
    ({**user("x"), "stream_options": "yes"}, "stream_options must be an object.", "stream_options"),
    (
        {**user("x"), "stream_options": {"include_usage": True}},
        "stream_options is only allowed when stream is true.",
        "stream_options",
    ),
    (
        {**user("x"), "thinking": "yes"},
        "thinking must be a boolean or {'type': 'enabled'|'disabled'}.",
        "thinking",
    ),
]


@pytest.mark.parametrize(("body", "message", "param"), REST_REFUSALS)
def test_each_rule_is_told_as_written_with_its_field(body, message, param) -> None:
    assert refusal(rest, body) == ("invalid_request", message, param)


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"n": 2}, "unsupported_value", "n"),
        ({"logprobs": True}, "unsupported_value", "logprobs"),
        ({"tools": [{"type": "function"}]}, "unsupported_parameter", "tools"),
        ({"function_call": "auto"}, "unsupported_parameter", "function_call"),
        ({"response_format": {"type": "json_object"}}, "unsupported_value", "response_format"),
    ],
)
def test_what_would_change_the_answer_is_refused_not_ignored(extra, code, param) -> None:
    assert refusal(rest, {**user("x"), **extra})[::2] == (code, param)


def test_drf_checks_are_left_to_the_rest_handler_and_come_first() -> None:
    """A field of the wrong type or range is DRF's own check (worded by the REST exception
    handler, code ``invalid_value``); a request with several faults is told that one."""
    with pytest.raises(serializers.ValidationError) as caught:
        rest({"messages": [], "n": 2, "temperature": 3})

    assert list(caught.value.detail) == ["temperature"]


def test_frame_refusals_name_the_conversation_message_and_word_option_errors() -> None:
    history = (ChatTurn(role="user", parts=("a",)), ChatTurn(role="assistant", parts=("b",)))

    assert refusal(frame, history) == (
        "invalid_request",
        "content must be a string or a non-empty list of parts.",
        "messages[2].content",
    )
    code, message, param = refusal(frame, content="hi", temperature=5)
    assert (code, param) == ("invalid_request", "temperature")
    assert message.startswith("temperature: ")
    # The content is judged before the options.
    assert refusal(frame, content=[], top_p="x")[2] == "messages[0].content"


def test_a_frame_system_prompt_goes_before_the_conversation() -> None:
    history = (ChatTurn(role="user", parts=("hi",)), ChatTurn(role="assistant", parts=("hello",)))
    inp = frame(history, content="and now?", system="Answer briefly.")
    assert [turn.role for turn in inp.turns] == ["system", "user", "assistant", "user"]
    assert inp.turns[0].parts == ("Answer briefly.",)
    # Blank instructions add no system message; a non-string is refused like any text.
    assert [turn.role for turn in frame(content="q", system="  ").turns] == ["user"]
    code, message, _param = refusal(frame, content="q", system=5)
    assert code == "invalid_request" and "'system'" in message
