"""The inference settings as one plain value, which each process builds its own way.

The web side builds it from Django settings (``inference.client.factory.inference_settings``),
the worker from the environment (``inference.worker.settings.worker_settings``): the same
variable names and defaults, and neither process imports the other's reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class InferenceSettings:
    """Everything the clients and the worker read from their settings, as plain data."""

    transport: str = "inprocess"
    redis_url: str = ""
    key_prefix: str = "inference"
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    blob_ttl_s: int = 900
    reply_ttl_s: int = 300
    claim_idle_ms: int = 2_000
    heartbeat_s: float = 0.25
    # The web side reuses a model's health (routing's live workers and queue) this long.
    health_cache_s: float = 0.25
    # The client gives up on a request after this long and reports TIMEOUT.
    request_timeout_s: float = 600.0
    # A request delivered this many times without finishing is a poison request.
    max_deliveries: int = 3
    # Cap on entries per reply stream (approximate trim); a reply longer than this loses
    # its oldest entries for a reader that joins very late.
    reply_maxlen: int = 10_000
    # Redis connections (docs/reliability.md): socket and connect timeouts, the idle time
    # after which a pooled connection is PINGed before reuse, retries on connection errors.
    redis_socket_timeout_s: float = 0.5
    redis_connect_timeout_s: float = 0.5
    redis_health_check_s: float = 1.0
    redis_retries: int = 3

    @property
    def heartbeat_ttl_s(self) -> float:
        # Three missed beats before a worker counts as dead.
        return max(3 * self.heartbeat_s, 1.0)

    @property
    def presence_grace_s(self) -> float:
        # A worker checks its presence subscription with every heartbeat and takes it again
        # at once when Redis lost it (a dropped connection, a failover; its IO thread retries
        # the broker within 50 ms, inference/worker/io.py): one found gone is acted on (its
        # requests taken, a waiting client told) only if it stays gone this long. Routing
        # counts it out at once.
        return 1.5 * self.heartbeat_s
