"""Step 5, submit: what the worker is asked, in the queue protocol's own types.

``inference_prompt`` turns the request into protocol messages and sampling parameters (also
what the answer cache hashes). ``completion_submit`` stores the validated images once, by
content hash and tenant, with a TTL (the request carries only references), and builds the
``InferenceRequest``; the client enqueues it when the run starts reading its events
(``InferenceClient.submit``, in ``webplatform.completions.streaming``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inference.client import InferenceClient
from inference.protocol import (
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    SamplingParams,
    TextPart,
)
from webplatform.completions.request import ChatCompletionInput, ImageSource, StoredImage
from webplatform.uploads.services import ValidatedImage


@dataclass(frozen=True)
class InferencePrompt:
    messages: list[Message]
    sampling: SamplingParams


def inference_prompt(
    *,
    inp: ChatCompletionInput,
    images: Mapping[ImageSource, ValidatedImage],
    max_tokens: int,
) -> InferencePrompt:
    messages = []
    for turn in inp.turns:
        parts: list[TextPart | ImagePart] = []
        for part in turn.parts:
            if isinstance(part, ImageSource):
                parts.append(ImagePart(image=images[part].ref()))
            elif isinstance(part, StoredImage):
                ref = ImageRef(sha256=part.sha256, width=part.width, height=part.height)
                parts.append(ImagePart(image=ref))
            else:
                parts.append(TextPart(text=part))
        messages.append(Message(role=turn.role, content=parts))
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=inp.temperature,
        top_p=inp.top_p,
        stop=list(inp.stop),
        seed=inp.seed,
        thinking=inp.thinking,
    )
    return InferencePrompt(messages=messages, sampling=sampling)


async def completion_submit(
    *,
    client: InferenceClient,
    request_id: str,
    tenant_id: str,
    model: str,
    prompt: InferencePrompt,
    images: Mapping[ImageSource, ValidatedImage],
    stream: bool,
) -> InferenceRequest:
    """Store the images the request refers to and build it for ``client.submit``."""
    for image in images.values():
        await client.put_model_image(
            model=model, tenant_id=tenant_id, data=image.data, ref=image.ref()
        )
    return InferenceRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        model=model,
        messages=prompt.messages,
        sampling=prompt.sampling,
        stream=stream,
    )
