"""uint8 patches + normalisation at the model against the HF image processor
(``inference/engine/pixels.py`` and its use in ``PromptBuilder.process_images`` and the runner).

The bar is bit-for-bit equality with the processor's ``pixel_values`` (not a tolerance): the
normaliser's table is filled by the processor's own arithmetic, so any difference is a bug.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Glm4vImageProcessorPil, Glm46VImageProcessorPil

from inference.engine.pixels import (
    PatchExtractor,
    PixelNormalizer,
    lookup_torch,
    patchify_uint8,
)
from inference.engine.prompt import PromptBuilder, decode_image
from tests.inference.conftest import chat_request, image_bytes


def _encoded(width: int, height: int, mode: str, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A noise image in ``mode`` (L, RGB, RGBA with varying alpha, P with a random palette)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    elif mode == "RGBA":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    else:
        return image_bytes(width, height, seed=seed, fmt=fmt)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# (width, height, mode, format): tiny, odd sizes that need resizing, one that needs none,
# one the processor scales down, extreme aspect ratios, and non-RGB inputs.
CASES = [
    (28, 28, "RGB", "PNG"),
    (56, 84, "RGB", "PNG"),
    (97, 203, "RGB", "PNG"),
    (5, 300, "RGB", "PNG"),
    (672, 672, "RGB", "PNG"),
    (672, 672, "RGB", "JPEG"),
    (1344, 1000, "RGB", "JPEG"),
    (150, 37, "L", "PNG"),
    (123, 77, "RGBA", "PNG"),
    (64, 90, "P", "PNG"),
]


@pytest.fixture(scope="module")
def builder(tiny_model_dir: Path) -> PromptBuilder:
    built = PromptBuilder.from_pretrained(str(tiny_model_dir), local_files_only=True)
    # Without this the tests below would compare the fallback path with itself.
    assert built.patch_extractor is not None, type(built.image_processor)
    return built


def _one_image(builder: PromptBuilder, data: bytes) -> Any:
    request = chat_request("r", "What is it?", images={"img": (1, 1)})
    [processed] = builder.process_images(request.messages, {"img": data}, scope="t")
    return processed


@pytest.mark.parametrize(("width", "height", "mode", "fmt"), CASES)
def test_uint8_path_equals_the_processor(builder, width, height, mode, fmt):
    data = _encoded(width, height, mode, fmt)
    reference = builder.image_processor(images=[decode_image(data)], return_tensors="pt")

    processed = _one_image(builder, data)

    assert processed.pixel_values.dtype == torch.uint8
    assert torch.equal(processed.grid_thw, reference["image_grid_thw"][0].to(torch.long))
    assert processed.tokens == int(reference["image_grid_thw"][0].prod()) // 4
    pixels = processed.model_pixels()
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, reference["pixel_values"])


def test_prompt_model_inputs_equal_the_reference_build(builder):
    """Several images in one prompt: ``model_inputs`` (what ``generate`` takes) as ``build``."""
    images = {
        "a": _encoded(97, 203, "RGB"),
        "b": _encoded(123, 77, "RGBA"),
        "c": _encoded(28, 28, "L"),
    }
    request = chat_request("r", "Compare them.", images={k: (1, 1) for k in images})
    processed = builder.process_images(request.messages, images, scope="t")
    staged = builder.build_from_processed(request.messages, processed, thinking=False)
    reference = builder.build(request.messages, images, thinking=False)

    staged_inputs, reference_inputs = staged.model_inputs(), reference.model_inputs()
    assert staged_inputs.keys() == reference_inputs.keys()
    for name, value in reference_inputs.items():
        assert torch.equal(staged_inputs[name], value), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_normalised_in_model_dtype_equals_casting_the_processor_output(builder, dtype):
    data = _encoded(97, 203, "RGB")
    reference = builder.image_processor(images=[decode_image(data)], return_tensors="pt")
    pixels = _one_image(builder, data).model_pixels(device=torch.device("cpu"), dtype=dtype)
    assert pixels.dtype == dtype
    assert torch.equal(pixels, reference["pixel_values"].to(dtype))


@pytest.mark.parametrize(
    "processor",
    [
        Glm46VImageProcessorPil(do_normalize=False),
        Glm46VImageProcessorPil(do_rescale=False),
        Glm46VImageProcessorPil(do_rescale=False, do_normalize=False),
        Glm46VImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=0.25, rescale_factor=1 / 127),
        Glm46VImageProcessorPil(do_resize=False),
        Glm46VImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1),
        Glm4vImageProcessorPil(),
    ],
    ids=[
        "no-normalize",
        "no-rescale",
        "neither",
        "other-stats",
        "no-resize",
        "other-patch",
        "glm4v",
    ],
)
def test_processor_settings_are_followed(processor):
    extractor = PatchExtractor.for_processor(processor)
    assert extractor is not None
    # do_resize=False needs sides that are already multiples of patch * merge (28).
    image = decode_image(_encoded(112, 56, "RGB", seed=4))
    reference = processor(images=[image], return_tensors="pt")

    patches, grid = extractor(image)

    assert patches.dtype == np.uint8
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    assert torch.equal(extractor.normalizer(torch.from_numpy(patches)), reference["pixel_values"])


def test_patchify_uint8_has_the_processors_layout():
    processor = Glm46VImageProcessorPil()
    image = np.random.default_rng(1).integers(0, 256, (3, 56, 140), dtype=np.uint8)
    expected, grid_h, grid_w = processor.patchify(
        image, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    patches, h, w = patchify_uint8(image, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert (h, w) == (grid_h, grid_w) == (4, 10)
    assert patches.dtype == np.uint8 and patches.flags.c_contiguous
    np.testing.assert_array_equal(patches.astype(np.float32), expected)


def test_unknown_processor_falls_back_to_the_full_processor(builder):
    class CustomProcessor(Glm46VImageProcessorPil):
        """A subclass could change any step: the uint8 path must not assume it did not."""

    processor = CustomProcessor()
    assert PatchExtractor.for_processor(processor) is None
    fallback = PromptBuilder(builder.tokenizer, processor)
    assert fallback.patch_extractor is None
    data = _encoded(97, 203, "RGB")

    processed = _one_image(fallback, data)

    assert processed.normalizer is None and processed.pixel_values.dtype == torch.float32
    reference = processor(images=[decode_image(data)], return_tensors="pt")
    assert torch.equal(processed.model_pixels(), reference["pixel_values"])


@pytest.mark.parametrize("block_rows", [1, 7, 512, 10**9])
def test_cpu_lookup_blocks_do_not_change_the_result(monkeypatch, block_rows):
    from inference.engine import pixels

    normalizer = PixelNormalizer.from_image_processor(Glm46VImageProcessorPil())
    patches = torch.randint(0, 256, (23, normalizer.columns), dtype=torch.uint8)
    channel = torch.arange(normalizer.columns) // (2 * 14 * 14)
    expected = normalizer.table[channel, patches.long()]  # the definition, by plain indexing
    monkeypatch.setattr(pixels, "_CPU_BLOCK_ROWS", block_rows)
    assert torch.equal(normalizer(patches), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerator_lookup_equals_the_processor(builder, dtype):
    """``lookup_torch`` (what a GPU runs) checked on CPU tensors against the processor."""
    data = _encoded(1344, 1000, "RGB", "JPEG")
    reference = builder.image_processor(images=[decode_image(data)], return_tensors="pt")
    processed = _one_image(builder, data)
    normalizer = processed.normalizer
    table = normalizer.table.reshape(-1).to(dtype)

    pixels = lookup_torch(table, normalizer.offsets, processed.pixel_values)

    assert torch.equal(pixels, reference["pixel_values"].to(dtype))


def test_normalizer_refuses_what_it_cannot_normalise():
    normalizer = PixelNormalizer.from_image_processor(Glm46VImageProcessorPil())
    assert normalizer.columns == 3 * 2 * 14 * 14
    with pytest.raises(ValueError):
        normalizer(torch.zeros(4, normalizer.columns, dtype=torch.float32))
    with pytest.raises(ValueError):
        normalizer(torch.zeros(4, 100, dtype=torch.uint8))


def test_runner_vision_input_equals_the_processor_output(tiny_runner):
    """The runner normalises on its device: same image embeddings as the processor's pixels."""
    data = _encoded(97, 203, "RGBA")
    request = chat_request("r", "What is it?", images={"img": (1, 1)})
    [processed] = tiny_runner.process_images(request.messages, {"img": data}, scope="t")
    prompt = tiny_runner.build_prompt(request.messages, [processed], thinking=False)
    assert processed.pixel_values.dtype == torch.uint8

    [encoded] = tiny_runner.encode_images([prompt], None)

    reference = tiny_runner.prompts.image_processor(
        images=[decode_image(data)], return_tensors="pt"
    )
    with torch.inference_mode():
        expected = tiny_runner.model.model.get_image_features(
            reference["pixel_values"].to(tiny_runner.dtype),
            reference["image_grid_thw"],
            return_dict=True,
        ).pooler_output
    assert torch.equal(encoded.embeddings[0], expected[0])


def test_the_pillow_processor_is_asked_for_even_where_torchvision_is_installed(
    tiny_model_dir, monkeypatch
):
    """A GPU host usually has torchvision, and transformers then picks the torchvision image
    processor unless told otherwise; the engine must get the Pillow one its uint8 path
    reproduces. torchvision cannot be installed here, so the request itself is checked."""
    from transformers import AutoImageProcessor

    original = AutoImageProcessor.from_pretrained
    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoImageProcessor, "from_pretrained", spy)
    built = PromptBuilder.from_pretrained(str(tiny_model_dir), local_files_only=True)
    # AutoProcessor loads one of its own too (``_from_auto``); the engine replaces it.
    ours = [call for call in calls if not call.get("_from_auto")]
    assert ours and all(call.get("backend") == "pil" for call in ours)
    assert type(built.image_processor) is Glm46VImageProcessorPil
    assert built.patch_extractor is not None
    # Where the whole processor loads, its reference path uses that same image processor.
    assert built.processor is None or built.processor.image_processor is built.image_processor
