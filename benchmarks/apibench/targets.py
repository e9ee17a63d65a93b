"""What the standard request is sent to: a server's HTTP API, or the engine alone.

A target turns an image into its per-request input (``prepare``, outside the timing) and
sends one (``call``), answering None or an error kind.
"""

from __future__ import annotations

import abc
import hashlib
import io
from pathlib import Path
from typing import Any

from .request import MODEL, inference_request, model_spec, request_body


class Target(abc.ABC):
    """Something to send the standard request to: ``call(item)`` -> None or an error kind."""

    mode: str

    @abc.abstractmethod
    async def call(self, item: Any) -> str | None: ...

    @abc.abstractmethod
    def prepare(self, jpeg: bytes) -> Any:
        """The per-request input made from one image, outside the timing."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook; most targets hold nothing
        pass


class HttpTarget(Target):
    """``POST /v1/chat/completions`` on a server, with an API key."""

    def __init__(self, mode: str, url: str, key: str, detail: str | None = None) -> None:
        import httpx

        self.mode = mode
        self.detail = detail
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=300,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
        )

    def prepare(self, jpeg: bytes) -> bytes:
        return request_body(jpeg, self.detail)

    async def call(self, item: bytes) -> str | None:
        import httpx

        try:
            response = await self.http.post("/v1/chat/completions", content=item)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if response.status_code != 200:
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):  # not our error object (a proxy's page)
                code = "unparsed"
            return f"{response.status_code} {code}"
        return None

    async def aclose(self) -> None:
        await self.http.aclose()


class EngineTarget(Target):
    """The floor: the request through the in-process inference client, no HTTP."""

    mode = "engine"

    def __init__(self, model_dir: Path, torch_threads: int) -> None:
        import torch

        from inference.client import build_inference_client

        torch.set_num_threads(torch_threads)  # as OMP_NUM_THREADS gives the servers
        from inference.settings import InferenceSettings

        self.client = build_inference_client(
            InferenceSettings(transport="inprocess", models={MODEL: model_spec(model_dir)})
        )

    def prepare(self, jpeg: bytes) -> tuple[bytes, Any]:
        """What validation hands the engine (``webplatform.uploads.validation``, step 7): the
        pixels as a binary PPM, so the floor pays nothing of validation (the decode of the
        client's JPEG included) and the worker's share of an image is the same in both."""
        from PIL import Image

        from inference.protocol import ImageRef

        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PPM")
        ppm = buffer.getvalue()
        sha = hashlib.sha256(ppm).hexdigest()
        return ppm, ImageRef(
            sha256=sha,
            width=image.width,
            height=image.height,
            media_type="image/x-portable-pixmap",
        )

    async def call(self, item: tuple[bytes, Any]) -> str | None:
        from inference.protocol import DoneEvent, ErrorEvent

        png, ref = item
        await self.client.put_image(tenant_id="bench", data=png, ref=ref)
        request = inference_request(ref)
        async for event in self.client.submit(request):
            if isinstance(event, ErrorEvent):
                return event.code.value
            if isinstance(event, DoneEvent):
                return None
        return "no terminal event"

    async def aclose(self) -> None:
        await self.client.aclose()
