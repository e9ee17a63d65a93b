"""Engine fixtures: the real tiny GLM-4.6V checkpoint, built once per test session.

Other inference tests may use ``tiny_model_dir`` (from tests/conftest.py: a checkpoint folder for ``engine_from_spec``
or ``INFERENCE_MODELS``), ``tiny_runner`` (float64 CPU runner), ``make_engine`` and the
request/image/prompt helpers below.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from inference.protocol import (
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    Priority,
    SamplingParams,
    TextPart,
)


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained, with a wide init: chaotic greedy output that any batching error changes."""
    import torch

    from inference.tiny_model import build_tiny_model

    torch.manual_seed(0)
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-glm4v-random"), seed=1, train_steps=0, init_std=0.3
    )


def _float64_runner(path: Path) -> Any:
    from inference.engine.runner import ModelRunner

    return ModelRunner.from_spec({"path": str(path), "dtype": "float64", "device": "cpu"})


@pytest.fixture(scope="session")
def tiny_runner(tiny_model_dir: Path) -> Any:
    """float64 on CPU: rules out near-tie rounding in the exactness tests."""
    return _float64_runner(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_random_runner(tiny_random_model_dir: Path) -> Any:
    return _float64_runner(tiny_random_model_dir)


@pytest.fixture
def fresh_runner(tiny_random_model_dir: Path) -> Any:
    """A float64 runner of its own, for tests that change a runner's state (compile it)."""
    return _float64_runner(tiny_random_model_dir)


@pytest.fixture
def make_engine(tiny_runner: Any) -> Iterator[Callable[..., Any]]:
    """``make_engine(max_batch_size=..., max_seq_len=..., ...)`` -> Engine on ``tiny_runner``."""
    from inference.engine import Engine, EngineConfig

    def factory(**config: Any) -> Engine:
        config.setdefault("max_seq_len", 512)
        return Engine(tiny_runner, EngineConfig(**config))

    yield factory


def image_bytes(width: int, height: int, *, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A deterministic noise image of the given size, encoded."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def chat_request(
    request_id: str,
    question: str,
    *,
    images: dict[str, tuple[int, int]] | None = None,
    tenant_id: str = "tenant-a",
    priority: Priority = Priority.NORMAL,
    **sampling: Any,
) -> InferenceRequest:
    """A one-turn user request; ``images`` maps sha -> (width, height), placed before the text."""
    sampling.setdefault("temperature", 0.0)
    parts: list[Any] = [
        ImagePart(ImageRef(sha256=sha, width=w, height=h)) for sha, (w, h) in (images or {}).items()
    ]
    parts.append(TextPart(question))
    return InferenceRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        model="tiny",
        messages=[Message(role="user", content=parts)],
        sampling=SamplingParams(**sampling),
        priority=priority,
    )


def prepared_prompt(
    runner: Any, question: str, *, image: tuple[int, int] | None = None, seed: int = 3
) -> Any:
    """The engine's ``PreparedPrompt`` of one user turn, with one noise image of
    ``image`` = (width, height) before the text when given."""
    images = {"img": image_bytes(*image, seed=seed)} if image else {}
    request = chat_request("prompt", question, images={"img": image} if image else None)
    processed = runner.process_images(request.messages, images, scope="tests")
    return runner.build_prompt(request.messages, processed, thinking=False)


def generate_alone(
    runner: Any, request: InferenceRequest, images: dict[str, bytes], *, max_new_tokens: int
) -> list[int]:
    """The reference: ``model.generate`` (greedy) on ``request`` alone; its new token ids."""
    import torch

    prompt = runner.prepare(request.messages, images, thinking=request.sampling.thinking)
    with torch.inference_mode():
        out = runner.model.generate(
            **prompt.model_inputs(), do_sample=False, max_new_tokens=max_new_tokens
        )
    return out[0, prompt.length :].tolist()


def parameter_storage_bytes(model: Any) -> int:
    """Bytes of the distinct storages behind ``model``'s parameters (views count once)."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(storages.values())


def run_to_completion(engine: Any, max_steps: int = 10_000) -> list[tuple[str, Any]]:
    """Step until nothing is unfinished; all events in order."""
    events: list[tuple[str, Any]] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return events
        events.extend(engine.step())
    raise AssertionError("engine did not finish")


@pytest.fixture
def redis_settings() -> Iterator[Callable[..., Any]]:
    """Make ``InferenceSettings`` for the Redis transport on the test Redis, each under a
    fresh key prefix (deleted afterwards), serving the model ``fake``; keyword arguments
    override the timings. Skips without a reachable Redis."""
    from inference.settings import InferenceSettings
    from tests.inference.fakes import delete_prefix, redis_url_for_tests, unique_prefix

    url = redis_url_for_tests()
    if url is None:
        pytest.skip("needs REDIS_URL pointing at a reachable Redis")
    prefixes: list[str] = []

    def make(**overrides: Any) -> InferenceSettings:
        prefixes.append(unique_prefix())
        fields: dict[str, Any] = {
            "transport": "redis",
            "redis_url": url,
            "key_prefix": prefixes[-1],
            "models": {"fake": {}},
            **overrides,
        }
        return InferenceSettings(**fields)

    yield make
    for prefix in prefixes:
        delete_prefix(url, prefix)
