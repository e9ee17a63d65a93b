"""What a chat completion asks for, independent of the wire it came over.

The REST API, the websocket chat and the playground each translate their own format into a
``ChatCompletionInput``; the completion service only ever sees this type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Channel(enum.StrEnum):
    REST = "rest"
    WEBSOCKET = "websocket"
    PLAYGROUND = "playground"


@dataclass(frozen=True)
class ImageSource:
    """An image as the client sent it (data URI, bare base64 or URL), not yet validated.

    ``param`` is the path of the field in the client's request, for error messages
    (``messages[0].content[1].image_url``).
    """

    url: str
    param: str
    detail: str | None = None


@dataclass(frozen=True)
class StoredImage:
    """An image validated and stored by an earlier turn of a conversation (same tenant)."""

    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "system" | "user" | "assistant"
    parts: tuple[str | ImageSource | StoredImage, ...]

    @property
    def images(self) -> tuple[ImageSource, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImageSource))


@dataclass(frozen=True)
class ChatCompletionInput:
    model: str
    turns: tuple[ChatTurn, ...]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    thinking: bool = False
    use_cache: bool = True
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def image_count(self) -> int:
        return sum(len(t.images) for t in self.turns)

    @property
    def deterministic(self) -> bool:
        """Same input, same output: greedy decoding or a fixed seed."""
        return self.temperature == 0.0 or self.seed is not None
