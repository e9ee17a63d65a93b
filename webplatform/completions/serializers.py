"""The chat request, defined once: messages, their content, and the sampling options.

Both entry points validate with these serializers and get a ``ChatCompletionInput``:

- ``ChatCompletionRequestSerializer``: the body of ``POST /v1/chat/completions``, in the
  OpenAI form (``messages`` with text and ``image_url`` parts) or the simple form
  ``{"image": "<base64>", "prompt": "..."}``. Its OpenAPI schema is generated from it.
- ``MessageFrameSerializer``: the websocket chat's ``message`` frame, one user message
  (``content``) and the same options.

``chat_options`` is the one normalisation of the options (defaults, ``top_p`` 0, ``thinking``).

Errors. A rule written for this API fails with a ``ValidationError`` carrying an OpenAI error
code (``RULE_CODES``) and a message shown to the client as it is, its ``param`` the field's
path (``messages[0].content[1].image_url``); DRF's own field checks (a type, a range) keep
DRF's code and wording, and each entry point words them its own way (REST through
``webplatform.api.errors``); ``webplatform.completions.request_errors`` picks the one error
a request with several is told.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty

from webplatform.completions.request import (
    ChatCompletionInput,
    ChatTurn,
    ImageSource,
    Role,
    StoredImage,
)
from webplatform.completions.request_errors import (
    UNSUPPORTED_PARAMETER,
    UNSUPPORTED_VALUE,
    rule_broken,
)

IMAGE_DETAILS = ("auto", "low", "high")
MAX_STOP_SEQUENCES = 4
# Integer options fit what carries them: a seed is a signed 64-bit value (OpenAI's int64,
# what msgpack packs and torch's generator takes); counts fit 32 bits.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1

# An OpenAPI schema of a referenced serializer, as the schema generator resolves it.
SchemaRef = Callable[[type[serializers.Serializer]], dict[str, Any]]


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (JSON's ``"\\ud800"``): not Unicode text, and
    it cannot be encoded as UTF-8 for the worker."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def checked_text(text: str) -> str:
    if has_surrogate(text):
        raise rule_broken("Text must be valid Unicode: lone surrogates are not allowed.")
    return text


def _at(name: str | int, error: serializers.ValidationError) -> serializers.ValidationError:
    """``error`` as the error of the field ``name`` (a key or a list index) of the value."""
    return serializers.ValidationError({str(name): error.detail})


class DescribedField(serializers.Field):
    """A field of a shape DRF's own fields cannot state (one of several types). Its
    ``openapi`` method gives its schema; ``webplatform.api.schema`` hands it to drf-spectacular.
    """

    # True: an absent or null value is judged by to_internal_value's rule too (DRF's own
    # "required" and "null" checks would word it otherwise).
    judges_absence = False

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        """The field's OpenAPI schema: each subclass states its own (there is no default)."""
        raise NotImplementedError(f"{type(self).__name__} states no OpenAPI schema")

    def run_validation(self, data: Any = empty) -> Any:
        if self.judges_absence:
            return self.to_internal_value(None if data is empty else data)
        return super().run_validation(data)

    def to_representation(self, value: Any) -> Any:
        return value


class KindField(DescribedField):
    """What says which shape a value has: a message's ``role``, a part's ``type``. The
    field that dispatches on it has already chosen the serializer by it."""

    def __init__(self, *values: str) -> None:
        self.values = values
        super().__init__()

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.values)}

    def to_internal_value(self, data: Any) -> Any:
        return data


class StrictCharField(serializers.CharField):
    """A string field that takes strings only: DRF's CharField turns a number into its
    text (``{"prompt": 0}`` would be asked as "0")."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class RuleTextField(serializers.CharField):
    """Any string (never a number turned into one, null characters included); absent, null
    or anything else breaks one rule, told in ``rule``."""

    def __init__(self, *, rule: str, **kwargs: Any) -> None:
        self.rule = rule
        super().__init__(**kwargs)
        self.validators = []  # CharField's own refuse null and surrogate characters

    def fail(self, key: str, **kwargs: Any) -> NoReturn:
        raise rule_broken(self.rule)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return checked_text(data)


# --- content parts ------------------------------------------------------------------------


class TextPartSerializer(serializers.Serializer):
    """A piece of text."""

    type = KindField("text")
    text = RuleTextField(
        rule="A text part needs a string 'text'.", allow_blank=True, trim_whitespace=False
    )


class ImageUrlSerializer(serializers.Serializer):
    """Where the image is."""

    url = serializers.CharField(
        help_text="The image as a data URI (`data:image/png;base64,...`) or bare base64. "
        "JPEG, PNG, WebP and GIF are accepted; links to other sites are refused."
    )
    detail = serializers.ChoiceField(
        choices=IMAGE_DETAILS,
        required=False,
        allow_null=True,
        help_text="Accepted for compatibility; every image is read at the model's own resolution.",
    )


@dataclass(frozen=True)
class ImageUrl:
    url: str
    detail: str | None


class ImageUrlField(DescribedField):
    """``image_url``: an ``ImageUrl`` object, or the URL alone as a string."""

    judges_absence = True

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        return {"oneOf": [ref(ImageUrlSerializer), {"type": "string"}]}

    def to_internal_value(self, data: Any) -> ImageUrl:
        url, detail = (
            (data.get("url"), data.get("detail")) if isinstance(data, dict) else (data, None)
        )
        if not isinstance(url, str) or not url:
            raise rule_broken("An image_url part needs 'image_url.url' (a data URI).")
        checked_text(url)
        if detail is not None and detail not in IMAGE_DETAILS:
            raise _at("detail", rule_broken("detail must be one of auto, low, high."))
        return ImageUrl(url=url, detail=detail)


class ImageUrlPartSerializer(serializers.Serializer):
    """An image (user messages only)."""

    type = KindField("image_url")
    image_url = ImageUrlField()


_PARTS: dict[str, type[serializers.Serializer]] = {
    "text": TextPartSerializer,
    "image_url": ImageUrlPartSerializer,
}

# A validated part: its text, or where its image is.
Part = str | ImageUrl


def _validated(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    if not serializer.is_valid():
        raise serializers.ValidationError(serializer.errors)
    return cast(dict[str, Any], serializer.validated_data)


class ContentField(DescribedField):
    """A message's ``content``: a string, or a non-empty list of parts."""

    judges_absence = True

    def __init__(self, *, images: bool, nullable: bool = False, **kwargs: Any) -> None:
        self.images = images
        self.nullable = nullable
        kwargs.setdefault("help_text", _CONTENT_HELP[images, nullable])
        super().__init__(**kwargs)

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        kinds = ["text", "image_url"] if self.images else ["text"]
        refs = {kind: ref(_PARTS[kind]) for kind in kinds}
        part: dict[str, Any] = (
            refs["text"]
            if len(refs) == 1
            else {
                "oneOf": list(refs.values()),
                "discriminator": {
                    "propertyName": "type",
                    "mapping": {kind: r["$ref"] for kind, r in refs.items()},
                },
            }
        )
        schema: dict[str, Any] = {
            "oneOf": [{"type": "string"}, {"type": "array", "items": part, "minItems": 1}]
        }
        if self.nullable:
            schema["nullable"] = True
        return schema

    def to_internal_value(self, data: Any) -> tuple[Part, ...]:
        if isinstance(data, str):
            return (checked_text(data),)
        if data is None and self.nullable:
            return ("",)
        if not isinstance(data, list) or not data:
            raise rule_broken("content must be a string or a non-empty list of parts.")
        parts: list[Part] = []
        for index, part in enumerate(data):
            try:
                parts.append(self._part(part))
            except serializers.ValidationError as error:
                raise _at(index, error) from None
        return tuple(parts)

    def _part(self, data: Any) -> Part:
        if not isinstance(data, dict):
            raise rule_broken("Each content part must be an object.")
        kind = data.get("type")
        if kind == "image_url" and not self.images:
            raise rule_broken("Only user messages may carry images.")
        serializer_class = _PARTS.get(kind) if isinstance(kind, str) else None
        if serializer_class is None:
            raise _at(
                "type",
                rule_broken(f"Unsupported content part type {kind!r}; use 'text' or 'image_url'."),
            )
        part = _validated(serializer_class, data)
        return part["text"] if kind == "text" else part["image_url"]


_CONTENT_HELP = {
    (True, False): "The question: text, or a list of text and image parts (at most "
    "`IMAGE_MAX_PER_REQUEST` images in the whole request).",
    (False, False): "Text, or a list of text parts.",
    (False, True): "Text, or a list of text parts; may be null.",
}


# --- messages -----------------------------------------------------------------------------


class SystemMessageSerializer(serializers.Serializer):
    """Instructions for the model (`developer` is the same as `system`)."""

    role = KindField("system", "developer")
    content = ContentField(images=False)


class UserMessageSerializer(serializers.Serializer):
    """What the user asks, with its images."""

    role = KindField("user")
    content = ContentField(images=True)


class AssistantMessageSerializer(serializers.Serializer):
    """An earlier answer of the model, for a conversation of several turns."""

    role = KindField("assistant")
    content = ContentField(images=False, nullable=True)


_MESSAGES: dict[str, type[serializers.Serializer]] = {
    "system": SystemMessageSerializer,
    "developer": SystemMessageSerializer,
    "user": UserMessageSerializer,
    "assistant": AssistantMessageSerializer,
}
_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class ValidatedMessage:
    role: Role
    parts: tuple[Part, ...]


class MessageField(DescribedField):
    """One message, of the role its ``role`` names."""

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        refs = {role: ref(serializer_class) for role, serializer_class in _MESSAGES.items()}
        unique = list({r["$ref"]: r for r in refs.values()}.values())
        return {
            "oneOf": unique,
            "discriminator": {
                "propertyName": "role",
                "mapping": {role: r["$ref"] for role, r in refs.items()},
            },
        }

    def to_internal_value(self, data: Any) -> ValidatedMessage:
        if not isinstance(data, dict):
            raise rule_broken("Each message must be an object.")
        role = data.get("role")
        serializer_class = _MESSAGES.get(role) if isinstance(role, str) else None
        if serializer_class is None:
            raise _at(
                "role",
                rule_broken(f"Unsupported role {role!r}; use system, user or assistant."),
            )
        message = _validated(serializer_class, data)
        return ValidatedMessage(role=_ROLES[message["role"]], parts=message["content"])


class MessagesField(serializers.ListField):
    """The conversation so far, oldest first; the last message is the user's question."""

    child = MessageField()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_empty=False, min_length=1, **kwargs)

    def fail(self, key: str, **kwargs: Any) -> NoReturn:
        raise rule_broken("messages must be a non-empty list.")

    def to_internal_value(self, data: Any) -> list[ValidatedMessage]:
        messages = cast(list[ValidatedMessage], super().to_internal_value(data))
        if messages[-1].role != "user":
            raise rule_broken("The last message must come from the user.")
        return messages


def chat_turns(messages: list[ValidatedMessage], *, first_index: int = 0) -> tuple[ChatTurn, ...]:
    """The validated messages as turns; ``first_index`` numbers them in ``param`` paths."""
    turns = []
    for i, message in enumerate(messages, start=first_index):
        parts: list[str | ImageSource | StoredImage] = []
        for j, part in enumerate(message.parts):
            if isinstance(part, ImageUrl):
                param = f"messages[{i}].content[{j}].image_url"
                parts.append(ImageSource(url=part.url, param=param, detail=part.detail))
            else:
                parts.append(part)
        turns.append(ChatTurn(role=message.role, parts=tuple(parts)))
    return tuple(turns)


# --- options --------------------------------------------------------------------------------


class ThinkingField(DescribedField):
    """``thinking``: a boolean, or GLM's own ``{"type": "enabled" | "disabled"}``."""

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        enabled = {
            "type": "object",
            "properties": {"type": {"type": "string", "enum": ["enabled", "disabled"]}},
            "required": ["type"],
        }
        return {"oneOf": [{"type": "boolean"}, enabled]}

    def to_internal_value(self, data: Any) -> bool:
        if isinstance(data, bool):
            return data
        if isinstance(data, dict) and data.get("type") in ("enabled", "disabled"):
            return bool(data["type"] == "enabled")
        raise rule_broken("thinking must be a boolean or {'type': 'enabled'|'disabled'}.")


class ChatOptionsSerializer(serializers.Serializer):
    """The model and the sampling options: the same in the REST body and a websocket frame."""

    model = StrictCharField(
        required=False,
        min_length=1,
        max_length=200,
        help_text="A model of `GET /v1/models`; the first one when absent.",
    )
    max_tokens = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=INT32_MAX,
        help_text="The longest answer, in tokens (at most the plan's limit); the plan's "
        "default when absent.",
    )
    temperature = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0.0,
        max_value=2.0,
        help_text="0 answers greedily (the same answer every time); default 1.",
    )
    top_p = serializers.FloatField(
        required=False, allow_null=True, min_value=0.0, max_value=1.0, help_text="Default 1."
    )
    seed = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=SEED_MIN,
        max_value=SEED_MAX,
        help_text="Sample reproducibly: the same seed and request give the same answer.",
    )
    thinking = ThinkingField(
        required=False,
        allow_null=True,
        help_text="Let the model reason before it answers (`reasoning_content`); off by default.",
    )
    quality = serializers.ChoiceField(
        choices=["standard", "high"],
        required=False,
        allow_null=True,
        help_text="With model `auto`: `high` always asks the large model; `standard` (the "
        "default) lets the routing rules choose.",
    )


@dataclass(frozen=True)
class ChatOptions:
    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    thinking: bool
    quality: str | None = None


def chat_options(data: Mapping[str, Any], *, default_model: str) -> ChatOptions:
    """The options of a validated request, with their defaults: the one normalisation."""
    temperature, top_p = data.get("temperature"), data.get("top_p")
    return ChatOptions(
        model=data.get("model") or default_model,
        max_tokens=data.get("max_tokens"),
        temperature=1.0 if temperature is None else float(temperature),
        # top_p 0 means 'only the likeliest token'; the sampler needs a positive mass.
        top_p=1.0 if top_p is None else max(float(top_p), 1e-6),
        seed=data.get("seed"),
        thinking=bool(data.get("thinking")),
        quality=data.get("quality"),
    )


# --- the REST body ------------------------------------------------------------------------


class StopField(DescribedField):
    """``stop``: a string, or a list of up to four."""

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        strings = {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "maxItems": MAX_STOP_SEQUENCES,
        }
        return {"oneOf": [{"type": "string"}, strings]}

    def to_internal_value(self, data: Any) -> tuple[str, ...]:
        if isinstance(data, str):
            return (checked_text(data),)
        if (
            isinstance(data, list)
            and all(isinstance(s, str) and s for s in data)
            and len(data) <= MAX_STOP_SEQUENCES
        ):
            return tuple(checked_text(s) for s in data)
        raise rule_broken("stop must be a string or a list of up to 4 non-empty strings.")


class StreamOptionsField(DescribedField):
    """``stream_options`` (with ``stream: true`` only)."""

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        include_usage = {
            "type": "boolean",
            "description": "Send one more chunk before `data: [DONE]` with the usage of the "
            "whole request and empty `choices`; every other chunk then has `usage: null`.",
        }
        return {"type": "object", "properties": {"include_usage": include_usage}}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if not data:  # false, 0, "" and [] mean none, as null does
            return {}
        if not isinstance(data, dict):
            raise rule_broken("stream_options must be an object.")
        return data


class RefusedField(DescribedField):
    """An OpenAI field that would change what the answer is and that this API cannot honour:
    refused rather than answered as if it were absent."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault(
            "help_text",
            "Not supported: a request that sets it is refused (`unsupported_parameter`).",
        )
        super().__init__(required=False, allow_null=True, **kwargs)

    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        # What is accepted: absent, null, an empty list (or "none", OpenAI's tool_choice).
        return {"type": "array", "maxItems": 0, "items": {}}

    def to_internal_value(self, data: Any) -> Any:
        if data in ([], "none"):
            return None
        raise rule_broken(
            f"'{self.field_name}' is not supported by this API.", code=UNSUPPORTED_PARAMETER
        )


class ResponseFormatField(DescribedField):
    def openapi(self, ref: SchemaRef) -> dict[str, Any]:
        text_only = {"type": "string", "enum": ["text"]}
        return {"type": "object", "properties": {"type": text_only}}

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "text"):
            raise rule_broken(
                "Only response_format {'type': 'text'} is supported.", code=UNSUPPORTED_VALUE
            )
        return data


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": 1})
class OneChoiceField(serializers.IntegerField):
    """``n``: only 1 (the schema says so; other values are refused with this API's own
    message, ``_one_choice``)."""


@extend_schema_field({"type": "boolean", "enum": [False]})
class NoLogprobsField(serializers.BooleanField):
    """``logprobs``: only false."""


def _one_choice(n: int | None) -> None:
    if n is not None and n != 1:
        raise rule_broken(
            f"n={n} is not supported: this API returns exactly one choice per request. "
            "Send n separate requests (with different seeds) instead.",
            code=UNSUPPORTED_VALUE,
        )


def _no_logprobs(logprobs: bool | None) -> None:
    if logprobs:
        raise rule_broken("logprobs are not supported.", code=UNSUPPORTED_VALUE)


class ChatCompletionRequestSerializer(ChatOptionsSerializer):
    """A chat completion request, in OpenAI's form (`messages`) or the simple form (`prompt`,
    with an optional `image`)."""

    messages = MessagesField(required=False, allow_null=True)
    image = StrictCharField(
        required=False,
        min_length=1,
        trim_whitespace=True,
        help_text="Simple form: one image as a data URI or bare base64.",
    )
    prompt = StrictCharField(
        required=False,
        allow_blank=False,
        min_length=1,
        max_length=100_000,
        help_text="Simple form: the question, instead of `messages`.",
    )
    max_completion_tokens = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=INT32_MAX,
        help_text="The same as `max_tokens` (OpenAI's newer name); it wins when both are set.",
    )
    stop = StopField(
        required=False,
        allow_null=True,
        help_text="The answer ends before the first of these strings.",
    )
    stream = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Answer with Server-Sent Events of `chat.completion.chunk` objects, "
        "ending with `data: [DONE]`.",
    )
    stream_options = StreamOptionsField(required=False, allow_null=True)
    # OpenAI's end-user identifier (abuse monitoring): accepted, never confused with the
    # member a usage record names.
    user = StrictCharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        max_length=256,
        help_text="Your own identifier of the end user; accepted and not used.",
    )
    n = OneChoiceField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=INT32_MAX,
        validators=[_one_choice],
        help_text="Only 1: one choice per request.",
    )
    logprobs = NoLogprobsField(
        required=False,
        allow_null=True,
        validators=[_no_logprobs],
        help_text="Not supported: only false.",
    )
    cache = serializers.BooleanField(
        required=False,
        default=True,
        help_text="Answer a deterministic request (temperature 0, or a seed) from the "
        "answer cache when it was asked before; `false` (or `Cache-Control: no-store`) "
        "always runs the model.",
    )
    tools = RefusedField()
    functions = RefusedField()
    tool_choice = RefusedField()
    function_call = RefusedField()
    audio = RefusedField()
    response_format = ResponseFormatField(
        required=False, allow_null=True, help_text='Only `{"type": "text"}`.'
    )

    # The order of the documentation, and of the errors of a request that breaks several.
    field_order = (
        "model",
        "messages",
        "image",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "user",
        "n",
        "logprobs",
        "thinking",
        "quality",
        "cache",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "audio",
        "response_format",
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        assert set(fields) == set(self.field_order)
        return {name: fields[name] for name in self.field_order}

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("messages") is None and attrs.get("prompt") is None:
            raise _at(
                "messages",
                rule_broken("Provide 'messages' (or the simple form 'prompt' with 'image')."),
            )
        if attrs.get("stream_options") and not attrs.get("stream"):
            raise _at(
                "stream_options",
                rule_broken("stream_options is only allowed when stream is true."),
            )
        return attrs

    def to_input(self, *, default_model: str, use_cache: bool = True) -> ChatCompletionInput:
        """The validated request (call after ``is_valid``); ``use_cache`` False when the
        entry point was asked not to use the answer cache."""
        data = cast(dict[str, Any], self.validated_data)
        if data.get("messages") is not None:
            turns = chat_turns(data["messages"])
        else:
            parts: list[str | ImageSource | StoredImage] = []
            if data.get("image"):
                parts.append(ImageSource(url=data["image"], param="image"))
            parts.append(data["prompt"])
            turns = (ChatTurn(role="user", parts=tuple(parts)),)
        options = chat_options(data, default_model=default_model)
        stream_options = data.get("stream_options") or {}
        return ChatCompletionInput(
            model=options.model,
            turns=turns,
            max_tokens=data.get("max_completion_tokens") or options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=data.get("stop") or (),
            seed=options.seed,
            stream=bool(data.get("stream")),
            include_usage=bool(stream_options.get("include_usage", False)),
            user=data.get("user"),
            thinking=options.thinking,
            use_cache=bool(data.get("cache", True)) and use_cache,
            quality=options.quality,
        )


# --- the websocket frame ------------------------------------------------------------------


class FrameModelField(StrictCharField):
    """A frame's ``model``: absent, null, empty or any false value means the conversation's
    model (else the first allowed)."""

    def to_internal_value(self, data: Any) -> str:
        return super().to_internal_value(data) if data else ""


class MessageFrameSerializer(ChatOptionsSerializer):
    """A websocket ``message`` frame: the user's next message and the options."""

    type = serializers.ChoiceField(choices=["message"])
    content = ContentField(images=True)
    model = FrameModelField(required=False, allow_null=True, allow_blank=True)
    system = RuleTextField(
        rule="'system' must be a string.",
        required=False,
        allow_blank=True,
        trim_whitespace=False,
        help_text="Instructions put before the conversation as its system message, for this "
        "message's answer (send it again with each message to keep it).",
    )

    def to_input(self, *, history: tuple[ChatTurn, ...], default_model: str) -> ChatCompletionInput:
        data = cast(dict[str, Any], self.validated_data)
        turn = chat_turns(
            [ValidatedMessage(role="user", parts=data["content"])], first_index=len(history)
        )
        system = data.get("system") or ""
        instructions = (ChatTurn(role="system", parts=(system,)),) if system.strip() else ()
        options = chat_options(data, default_model=default_model)
        return ChatCompletionInput(
            model=options.model,
            turns=(*instructions, *history, *turn),
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stream=True,
            thinking=options.thinking,
            quality=options.quality,
        )


__all__ = [
    "ChatCompletionRequestSerializer",
    "ChatOptionsSerializer",
    "DescribedField",
    "MessageFrameSerializer",
    "chat_turns",
]
