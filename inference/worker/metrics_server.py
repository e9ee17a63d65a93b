"""The HTTP port of one inference worker: ``/metrics``, ``/ready`` and ``/live``.

``MetricsServer`` serves ``/metrics`` (the exposition of ``WorkerMetrics``), ``/ready`` (200
once the model is loaded and warmed and the loop has joined the queue, 503 while loading,
draining or stalled) and ``/live`` (200 unless the loop has not come round for ``stall_s``
seconds: a hung engine step; 200 while the model loads, which has no such bound).
Kubernetes' probes and ``docker compose`` health checks use them.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from inference.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class MetricsServer:
    """``/metrics``, ``/ready`` and ``/live`` of one ``WorkerMetrics`` on a port of its own,
    served from a daemon thread. ``port=0`` takes a free port (``.port`` says which)."""

    def __init__(self, metrics: WorkerMetrics, *, host: str = "0.0.0.0", port: int = 9400) -> None:
        self.metrics = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/ready":
                    ok = metrics.is_ready()
                    self._send(200 if ok else 503, metrics.state.encode() + b"\n")
                elif path == "/live":
                    ok = metrics.is_live()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes and probes every few seconds: not worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-server", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        logger.info("metrics on :%d (/metrics, /ready, /live)", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
