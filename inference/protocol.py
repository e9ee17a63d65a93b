"""The vocabulary the web side and the inference workers share.

Everything that crosses the internal queue is one of these msgspec structs, encoded with
``encode`` and decoded with ``decode_request`` / ``decode_event``. No raw dicts cross Redis.
Where they lie in Redis (``KeySpace``, the entry fields, the consumer group) is here too, so
that neither side reads the other's module. This module imports nothing from Django, so the
worker can run without the web code.

Images never travel inline: the web side stores validated, re-encoded bytes once under a
content hash (``ImageRef.sha256``), scoped to the tenant, and the worker fetches them.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Annotated, Literal

import msgspec


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # client went away or asked to stop


class ErrorCode(enum.StrEnum):
    """Error codes an inference ``ErrorEvent`` may carry (OpenAI-style ``code`` values)."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    IMAGE_UNAVAILABLE = "image_unavailable"  # blob expired or missing
    MODEL_NOT_FOUND = "model_not_found"
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_LOST = "worker_lost"  # worker died after streaming part of the answer
    INTERNAL_ERROR = "internal_error"
    TIMEOUT = "timeout"


# The error policy of the inference side. A client reads an ``ErrorEvent``'s code and
# message; the message is the fixed sentence of its code below, or a more specific one made
# only of what the client itself sent or may know (its model name, its image's hash, its
# token counts, how long it waited). Never an exception's text: that names devices, paths,
# shapes and other tenants' requests, and goes to the log of the process that caught it.
ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INVALID_REQUEST: "The model could not process this request as sent.",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "The prompt and max_tokens exceed what the model holds.",
    ErrorCode.IMAGE_UNAVAILABLE: "An image of this request expired or was never stored.",
    ErrorCode.MODEL_NOT_FOUND: "The model does not exist.",
    ErrorCode.OUT_OF_MEMORY: "The model ran out of memory; retry, or send a smaller request.",
    ErrorCode.WORKER_LOST: "The worker stopped before the answer was complete.",
    ErrorCode.INTERNAL_ERROR: "The model failed while serving this request.",
    ErrorCode.TIMEOUT: "No answer in time.",
}
# Codes that say the failure was ours, not the request's: they only ever carry the fixed
# sentence (an engine's own wording for them is replaced by the worker).
SERVER_ERRORS = frozenset(
    {ErrorCode.OUT_OF_MEMORY, ErrorCode.WORKER_LOST, ErrorCode.INTERNAL_ERROR}
)


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2


class ImageRef(msgspec.Struct, frozen=True):
    """A validated image stored by content hash (tenant-scoped) for the worker to fetch."""

    sha256: str
    width: int
    height: int
    media_type: str = "image/png"


class TextPart(msgspec.Struct, frozen=True, tag="text"):
    text: str


class ImagePart(msgspec.Struct, frozen=True, tag="image"):
    image: ImageRef


ContentPart = TextPart | ImagePart


class Message(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: list[ContentPart]


class SamplingParams(msgspec.Struct, frozen=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    stop: list[str] = []
    seed: int | None = None
    thinking: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class InferenceRequest(msgspec.Struct, frozen=True):
    request_id: str
    tenant_id: str
    model: str
    messages: list[Message]
    sampling: SamplingParams = SamplingParams()
    priority: Priority = Priority.NORMAL
    stream: bool = True
    created_at: float = msgspec.field(default_factory=time.time)
    # Absolute unix time after which the worker should not start the request.
    deadline: float | None = None

    def image_refs(self) -> list[ImageRef]:
        return [
            part.image for m in self.messages for part in m.content if isinstance(part, ImagePart)
        ]


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    reasoning_tokens: int = 0
    cached_image_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class StartEvent(msgspec.Struct, frozen=True, tag="start"):
    """The engine admitted the request and finished its prefill."""

    prompt_tokens: int
    image_tokens: int = 0


class DeltaEvent(msgspec.Struct, frozen=True, tag="delta"):
    """New answer text (``text``) and/or reasoning text (``reasoning``) since the last delta."""

    text: str = ""
    reasoning: str = ""
    tokens: int = 0  # tokens generated that this delta covers


class DoneEvent(msgspec.Struct, frozen=True, tag="done"):
    finish_reason: FinishReason
    usage: Usage
    # Mean log-probability of the answer's tokens, when the engine reports one (an
    # ``openai-upstream`` model that returns logprobs); None otherwise. Routing's escalation
    # reads it (``webplatform.completions.escalation``).
    mean_logprob: float | None = None


class ErrorEvent(msgspec.Struct, frozen=True, tag="error"):
    code: ErrorCode
    message: str
    # True when nothing was streamed yet and the request may be retried elsewhere.
    retryable: bool = False

    @classmethod
    def fixed(cls, code: ErrorCode, *, retryable: bool = False) -> ErrorEvent:
        """The error with its code's fixed message (``ERROR_MESSAGES``)."""
        return cls(code, ERROR_MESSAGES[code], retryable=retryable)


class NoticeEvent(msgspec.Struct, frozen=True, tag="notice"):
    """Why a request still waits, for a client that sees nothing else meanwhile: the answer
    goes on after it. ``code`` is one of ``NOTICE_MESSAGES``."""

    code: str
    message: str

    @classmethod
    def fixed(cls, code: str) -> NoticeEvent:
        return cls(code, NOTICE_MESSAGES[code])


TAKEN_OVER = "taken_over"
NOTICE_MESSAGES = {
    TAKEN_OVER: "The worker serving this request stopped; another worker took it over and "
    "starts it again.",
}

Event = StartEvent | DeltaEvent | DoneEvent | ErrorEvent | NoticeEvent
TERMINAL_EVENTS = (DoneEvent, ErrorEvent)

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(InferenceRequest)
_event_decoder: msgspec.msgpack.Decoder[Event] = msgspec.msgpack.Decoder(Event)


def encode(message: InferenceRequest | Event) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> InferenceRequest:
    return _request_decoder.decode(data)


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


class WorkerHeartbeat(msgspec.Struct, frozen=True):
    """What each worker publishes about itself, refreshed every few seconds with a TTL."""

    worker_id: str
    model: str
    running: int
    waiting: int
    max_batch_size: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    tokens_per_second: float
    memory_bytes: int
    device: str
    started_at: float
    updated_at: float
    # Engine detail (defaults: what an older worker, or one without it, reports).
    prefilling: int = 0  # of ``running``: prompts still being prefilled
    decoding: int = 0  # rows of the last decode step
    batch_bucket: int = 0  # its padded batch size (occupancy = decoding / batch_bucket)
    step_ms_p50: float | None = None  # engine steps that decoded, recent window
    step_ms_p99: float | None = None
    compiled_batch_sizes: tuple[int, ...] = ()  # decode buckets running compiled code
    compile_error: str | None = None  # why compiling failed (every bucket then eager)
    # The worker holds a subscription to its presence channel (``KeySpace.presence``) while
    # its process lives; False from a worker that does not (an older one).
    presence: bool = False

    @property
    def batch_occupancy(self) -> float:
        """Real rows over padded rows of the worker's last decode step (1.0 if none ran)."""
        return self.decoding / self.batch_bucket if self.batch_bucket else 1.0


_heartbeat_decoder = msgspec.msgpack.Decoder(WorkerHeartbeat)


def encode_heartbeat(hb: WorkerHeartbeat) -> bytes:
    return _encoder.encode(hb)


def decode_heartbeat(data: bytes) -> WorkerHeartbeat:
    return _heartbeat_decoder.decode(data)


# --- Where the messages lie in Redis (DESIGN.md "Internal queue protocol") ----------------

GROUP = "workers"  # the one consumer group every worker of a model joins
REQUEST_FIELD = b"r"  # the one field of a request entry: the encoded InferenceRequest
EVENT_FIELD = b"e"  # the one field of a reply entry: one encoded Event


class KeySpace(msgspec.Struct, frozen=True):
    """Redis key names of the queue protocol, under one prefix (``INFERENCE_KEY_PREFIX``)."""

    prefix: str = "inference"

    def requests(self, model: str) -> str:
        """Stream of a model's unfinished requests (``REQUEST_FIELD`` entries)."""
        return f"{self.prefix}:{model}:requests"

    def reply(self, request_id: str) -> str:
        """Stream of one request's events (``EVENT_FIELD`` entries)."""
        return f"{self.prefix}:reply:{request_id}"

    def cancel(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{request_id}"

    def blob(self, tenant_id: str, sha256: str) -> str:
        return f"{self.prefix}:blob:{tenant_id}:{sha256}"

    def heartbeat(self, model: str, worker_id: str) -> str:
        return f"{self.prefix}:{model}:worker:{worker_id}"

    def registry(self, model: str) -> str:
        """ZSET of the model's worker ids scored by last heartbeat (unix seconds)."""
        return f"{self.prefix}:{model}:workers"

    def presence(self, model: str, worker_id: str) -> str:
        """A pub/sub channel (not a key) the worker stays subscribed to while its process
        lives: Redis drops the subscription the moment the worker's connection closes, so
        ``PUBSUB NUMSUB`` of it turns 0 at a crash, not a heartbeat TTL later."""
        return f"{self.prefix}:{model}:presence:{worker_id}"


class HeartbeatPresence(msgspec.Struct, frozen=True):
    """The one field of a heartbeat that liveness reads (a heartbeat decoded as this skips
    the rest); ``WorkerHeartbeat`` has it too."""

    presence: bool = False


_presence_decoder = msgspec.msgpack.Decoder(HeartbeatPresence)


def decode_heartbeat_presence(data: bytes) -> HeartbeatPresence:
    """Whether a heartbeat declares presence; one that does not decode declares none, so
    only its key's expiry can make its worker look dead."""
    try:
        return _presence_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return HeartbeatPresence()


class Liveness(enum.Enum):
    """What the web side and the other workers make of one registered worker."""

    LIVE = "live"  # its heartbeat is fresh and (if it declares one) its presence is held
    GONE = "gone"  # its process is gone: its presence connection closed, or nothing is left
    SILENT = "silent"  # connected but no heartbeat for a TTL: stuck, or only late


def worker_liveness(beat: WorkerHeartbeat | HeartbeatPresence | None, subscribers: int) -> Liveness:
    """One worker's state from its heartbeat key (None: expired) and the subscriber count of
    its presence channel. A closed connection is proof of a dead process (Redis unsubscribes
    it at once); a missing heartbeat alone may be a late one, hence ``SILENT``."""
    if beat is not None:
        return Liveness.LIVE if subscribers > 0 or not beat.presence else Liveness.GONE
    return Liveness.SILENT if subscribers > 0 else Liveness.GONE
