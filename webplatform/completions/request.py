"""What a chat completion asks for, and who asks, whatever the wire it came over.

The REST API, the websocket chat and the playground each turn their own format into a
``ChatCompletionInput`` with the one request schema (``webplatform.completions.serializers``);
the request path (``webplatform.completions.pipeline``) only ever sees these types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tenants.principals import ApiPrincipal

if TYPE_CHECKING:
    from tenants.models import Tenant


class EntryPoint(enum.StrEnum):
    """Where a request came in. Its value is what the usage record stores in ``channel`` and
    what the metrics label ``channel`` says (the same three values)."""

    REST = "rest"
    WEBSOCKET = "websocket"
    PLAYGROUND = "playground"


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the entry point's authentication resolved it, and through what."""

    principal: ApiPrincipal
    entry_point: EntryPoint

    @property
    def tenant(self) -> Tenant:
        return self.principal.tenant


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


Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatTurn:
    role: Role
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
    # "high" sends a request for model "auto" to the slow model (model_choice.py).
    quality: str | None = None

    @property
    def image_count(self) -> int:
        return sum(len(t.images) for t in self.turns)

    @property
    def deterministic(self) -> bool:
        """Same input, same output: greedy decoding or a fixed seed."""
        return self.temperature == 0.0 or self.seed is not None
