"""OpenAI wire objects for chat completions: the response, its chunks, errors, SSE framing.

Each shape is a msgspec struct below; the builders make them from the one answer type
(``webplatform.completions.answer``: ``DeltaEvent`` items, then an ``Answer``) and the OpenAPI
schema of the responses is generated from the same structs (``webplatform.api.schema``).
Their docstrings and field descriptions are what ``/v1/docs`` shows.

Shapes follow the OpenAI API exactly (the official SDKs parse them): ``chat.completion`` for
a whole answer and ``chat.completion.chunk`` for streaming, with a first chunk that carries
the role, content chunks, a final chunk with ``finish_reason``, an optional usage chunk with
empty ``choices``, then ``data: [DONE]``. A field set to ``UNSET`` is left out of the JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from inference.protocol import DeltaEvent, FinishReason, Usage
from tenants.errors import ApplicationError
from webplatform.completions.answer import Answer

# OpenAI has no "cancelled"; a stream the client stopped ends as "stop".
WireFinishReason = Literal["stop", "length"]


def _finish_reason(reason: FinishReason) -> WireFinishReason:
    return "length" if reason is FinishReason.LENGTH else "stop"


# --- usage ----------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: Annotated[int, Meta(description="Always 0.")]
    image_tokens: Annotated[int, Meta(description="Prompt tokens that encode the images.")]


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: Annotated[int, Meta(description="Tokens of `reasoning_content`.")]


class CompletionUsage(msgspec.Struct):
    """The tokens a request used (the figures it is billed by)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


def usage_object(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=0, image_tokens=usage.image_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
    )


# --- chat.completion --------------------------------------------------------------------------


class ChatCompletionMessage(msgspec.Struct):
    """The answer."""

    role: Literal["assistant"]
    content: str
    refusal: Annotated[None, Meta(description="Always null.")]
    reasoning_content: (
        Annotated[str, Meta(description="The model's reasoning, when `thinking` was on.")]
        | UnsetType
    ) = UNSET


class Choice(msgspec.Struct):
    index: int
    message: ChatCompletionMessage
    logprobs: Annotated[None, Meta(description="Always null.")]
    finish_reason: Annotated[
        WireFinishReason,
        Meta(description="`length` when `max_tokens` ended the answer, else `stop`."),
    ]


class ChatCompletion(msgspec.Struct):
    """A whole answer (`chat.completion`)."""

    id: str
    object: Literal["chat.completion"]
    created: Annotated[int, Meta(description="Unix time (seconds).")]
    model: Annotated[str, Meta(description="The model that answered (a fallback says so).")]
    system_fingerprint: Annotated[None, Meta(description="Always null.")]
    choices: list[Choice]
    usage: CompletionUsage


def completion_object(
    *, request_id: str, model: str, created: int, answer: Answer
) -> ChatCompletion:
    message = ChatCompletionMessage(
        role="assistant",
        content=answer.text,
        refusal=None,
        reasoning_content=answer.reasoning or UNSET,
    )
    return ChatCompletion(
        id=f"chatcmpl-{request_id}",
        object="chat.completion",
        created=created,
        model=model,
        system_fingerprint=None,
        choices=[
            Choice(
                index=0,
                message=message,
                logprobs=None,
                finish_reason=_finish_reason(answer.finish_reason),
            )
        ],
        usage=usage_object(answer.usage),
    )


# --- chat.completion.chunk ------------------------------------------------------------------


class ChunkDelta(msgspec.Struct):
    """What a chunk adds to the answer."""

    role: Literal["assistant"] | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: Annotated[
        WireFinishReason | None, Meta(description="Set on the last chunk of the answer only.")
    ]


class ChatCompletionChunk(msgspec.Struct):
    """One Server-Sent Event of a streamed answer (`chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: Annotated[
        list[ChunkChoice], Meta(description="Empty in the usage chunk, one choice otherwise.")
    ]
    usage: (
        Annotated[
            CompletionUsage | None,
            Meta(
                description="With `stream_options.include_usage` only: null on every chunk "
                "but the usage chunk."
            ),
        ]
        | UnsetType
    ) = UNSET


class ChunkStream:
    """The chunks of one streamed answer, in order: ``first``, a ``delta`` per piece of
    text, ``last``, and with ``include_usage`` a ``usage`` chunk."""

    def __init__(self, *, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage

    def _chunk(
        self, choices: list[ChunkChoice], usage: CompletionUsage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            system_fingerprint=None,
            choices=choices,
            # With include_usage, OpenAI sends "usage": null on every chunk but the last.
            usage=usage if self.include_usage else UNSET,
        )

    def _choice(
        self, delta: ChunkDelta, finish_reason: WireFinishReason | None = None
    ) -> list[ChunkChoice]:
        return [ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish_reason)]

    def first(self) -> ChatCompletionChunk:
        return self._chunk(self._choice(ChunkDelta(role="assistant", content="")))

    def delta(self, event: DeltaEvent) -> ChatCompletionChunk | None:
        """The chunk of a piece of text; None when it carries none."""
        if not (event.text or event.reasoning):
            return None
        delta = ChunkDelta(reasoning_content=event.reasoning or UNSET, content=event.text or UNSET)
        return self._chunk(self._choice(delta))

    def last(self, answer: Answer) -> ChatCompletionChunk:
        return self._chunk(self._choice(ChunkDelta(), _finish_reason(answer.finish_reason)))

    def usage(self, answer: Answer) -> ChatCompletionChunk:
        return self._chunk([], usage_object(answer.usage))


# --- errors -----------------------------------------------------------------------------------


class ErrorObject(msgspec.Struct):
    message: str
    type: Annotated[
        str, Meta(description="`invalid_request_error`, `rate_limit_error` or `server_error`.")
    ]
    param: Annotated[str | None, Meta(description="The request field at fault, if one is.")]
    code: Annotated[str | None, Meta(description="Which rule the request broke.")]


class ErrorResponse(msgspec.Struct):
    """An error (OpenAI's error object)."""

    error: ErrorObject


def error_object(exc: ApplicationError) -> ErrorResponse:
    """The one OpenAI error body: every REST error, and the in-band error of a stream."""
    return ErrorResponse(
        error=ErrorObject(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    )


# --- encoding -----------------------------------------------------------------------------


def as_json_data(obj: msgspec.Struct) -> Any:
    """``obj`` as plain JSON data, for a DRF ``Response`` or a ``JsonResponse``."""
    return msgspec.to_builtins(obj)


_json = msgspec.json.Encoder()


def json_body(obj: msgspec.Struct) -> bytes:
    """``obj`` as a JSON response body: encoded once, by msgspec (a DRF ``Response`` would
    convert it to builtins, then render it with ``json.dumps`` in a thread hand-off)."""
    return _json.encode(obj)


def sse(obj: msgspec.Struct) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def sse_comment(text: str) -> bytes:
    """An SSE comment line: clients (OpenAI's SDKs included) skip it, people and proxies
    see it. One line: line breaks in ``text`` become spaces."""
    return b": " + " ".join(text.splitlines()).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

__all__ = [
    "SSE_DONE",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChunkStream",
    "ErrorResponse",
    "as_json_data",
    "completion_object",
    "error_object",
    "json_body",
    "sse",
]
