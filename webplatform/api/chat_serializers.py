"""Parse an OpenAI chat completion request body into a ``ChatCompletionInput``.

Accepts the OpenAI form (``messages`` with text and ``image_url`` parts) and the simple form
``{"image": "<base64>", "prompt": "...", "max_tokens": 256, "temperature": 0.7}``.
Unknown OpenAI fields that do not change the answer (``n=1``, ``logprobs=false``, ...) are
accepted; fields we cannot honour are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from tenants.errors import ApplicationError
from webplatform.completions.request import ChatCompletionInput, ChatTurn, ImageSource

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _invalid(message: str, *, param: str | None, code: str = "invalid_request") -> ApplicationError:
    return ApplicationError(message, code=code, status=400, param=param)


def parse_content(content: Any, *, role: str, index: int) -> tuple[str | ImageSource, ...]:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return (content,)
    if content is None and role == "assistant":
        return ("",)
    if not isinstance(content, list) or not content:
        raise _invalid("content must be a string or a non-empty list of parts.", param=param)
    parts: list[str | ImageSource] = []
    for j, part in enumerate(content):
        part_param = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _invalid("Each content part must be an object.", param=part_param)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _invalid("A text part needs a string 'text'.", param=f"{part_param}.text")
            parts.append(text)
        elif kind == "image_url":
            if role != "user":
                raise _invalid("Only user messages may carry images.", param=part_param)
            image_url = part.get("image_url")
            detail = None
            if isinstance(image_url, dict):
                detail = image_url.get("detail")
                image_url = image_url.get("url")
            if not isinstance(image_url, str) or not image_url:
                raise _invalid(
                    "An image_url part needs 'image_url.url' (a data URI).",
                    param=f"{part_param}.image_url",
                )
            if detail not in (None, "auto", "low", "high"):
                raise _invalid(
                    "detail must be one of auto, low, high.", param=f"{part_param}.image_url.detail"
                )
            parts.append(ImageSource(url=image_url, param=f"{part_param}.image_url", detail=detail))
        else:
            raise _invalid(
                f"Unsupported content part type {kind!r}; use 'text' or 'image_url'.",
                param=f"{part_param}.type",
            )
    return tuple(parts)


def parse_messages(raw: Any) -> tuple[ChatTurn, ...]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages must be a non-empty list.", param="messages")
    turns = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _invalid("Each message must be an object.", param=f"messages[{i}]")
        role = _ROLES.get(message.get("role", ""))
        if role is None:
            raise _invalid(
                f"Unsupported role {message.get('role')!r}; use system, user or assistant.",
                param=f"messages[{i}].role",
            )
        turns.append(
            ChatTurn(role=role, parts=parse_content(message.get("content"), role=role, index=i))
        )
    if turns[-1].role != "user":
        raise _invalid("The last message must come from the user.", param="messages")
    return tuple(turns)


def _parse_thinking(value: Any) -> bool:
    # GLM's own API takes {"type": "enabled" | "disabled"}; a plain boolean is accepted too.
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, dict) and value.get("type") in ("enabled", "disabled"):
        return value["type"] == "enabled"
    raise _invalid(
        "thinking must be a boolean or {'type': 'enabled'|'disabled'}.", param="thinking"
    )


# OpenAI request fields that would change what the answer is; we cannot honour them, so a
# request carrying them is refused instead of answered as if they were absent.
_UNSUPPORTED_FIELDS = ("tools", "functions", "tool_choice", "function_call", "audio")


def _refuse_unsupported(data: dict[str, Any], raw: Any) -> None:
    n = data.get("n")
    if n is not None and n != 1:
        raise _invalid(
            f"n={n} is not supported: this API returns exactly one choice per request. "
            "Send n separate requests (with different seeds) instead.",
            param="n",
            code="unsupported_value",
        )
    if data.get("logprobs"):
        raise _invalid("logprobs are not supported.", param="logprobs", code="unsupported_value")
    if isinstance(raw, dict):
        for name in _UNSUPPORTED_FIELDS:
            if raw.get(name) not in (None, [], "none"):
                raise _invalid(
                    f"'{name}' is not supported by this API.",
                    param=name,
                    code="unsupported_parameter",
                )
        response_format = raw.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") not in (
            None,
            "text",
        ):
            raise _invalid(
                "Only response_format {'type': 'text'} is supported.",
                param="response_format",
                code="unsupported_value",
            )


class ChatCompletionRequestSerializer(serializers.Serializer):
    """The OpenAI request body (and the simple form). Validation errors become OpenAI errors."""

    model = serializers.CharField(required=False, max_length=200)
    messages = serializers.JSONField(required=False)
    image = serializers.CharField(required=False, trim_whitespace=True)
    prompt = serializers.CharField(required=False, allow_blank=False, max_length=100_000)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    temperature = serializers.FloatField(
        required=False, allow_null=True, min_value=0.0, max_value=2.0
    )
    top_p = serializers.FloatField(required=False, allow_null=True, min_value=0.0, max_value=1.0)
    stop = serializers.JSONField(required=False, allow_null=True)
    seed = serializers.IntegerField(required=False, allow_null=True)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = serializers.JSONField(required=False, allow_null=True)
    # OpenAI's end-user identifier (abuse monitoring): accepted, never confused with the
    # member a usage record names.
    user = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=256)
    n = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    logprobs = serializers.BooleanField(required=False, allow_null=True)
    thinking = serializers.JSONField(required=False, allow_null=True)
    cache = serializers.BooleanField(required=False, default=True)

    def to_input(self, *, default_model: str) -> ChatCompletionInput:
        data: dict[str, Any] = self.validated_data  # type: ignore[assignment]
        _refuse_unsupported(data, self.initial_data)
        if data.get("messages") is not None:
            turns = parse_messages(data["messages"])
        elif data.get("prompt") is not None:
            parts: list[str | ImageSource] = []
            if data.get("image"):
                parts.append(ImageSource(url=data["image"], param="image"))
            parts.append(data["prompt"])
            turns = (ChatTurn(role="user", parts=tuple(parts)),)
        else:
            raise _invalid(
                "Provide 'messages' (or the simple form 'prompt' with 'image').", param="messages"
            )

        stop = data.get("stop")
        if stop is None:
            stop_tuple: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stop_tuple = (stop,)
        elif (
            isinstance(stop, list)
            and all(isinstance(s, str) and s for s in stop)
            and len(stop) <= 4
        ):
            stop_tuple = tuple(stop)
        else:
            raise _invalid(
                "stop must be a string or a list of up to 4 non-empty strings.", param="stop"
            )

        stream_options = data.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _invalid("stream_options must be an object.", param="stream_options")
        if stream_options and not data.get("stream"):
            raise _invalid(
                "stream_options is only allowed when stream is true.", param="stream_options"
            )

        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        temperature = data.get("temperature")
        top_p = data.get("top_p")
        return ChatCompletionInput(
            model=data.get("model") or default_model,
            turns=turns,
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else float(temperature),
            # top_p 0 means 'only the likeliest token'; the sampler needs a positive mass.
            top_p=1.0 if top_p is None else max(float(top_p), 1e-6),
            stop=stop_tuple,
            seed=data.get("seed"),
            stream=bool(data.get("stream")),
            include_usage=bool(stream_options.get("include_usage", False)),
            user=data.get("user"),
            thinking=_parse_thinking(data.get("thinking")),
            use_cache=bool(data.get("cache", True)),
        )
