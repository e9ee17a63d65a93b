"""Decode on the CPU, resize + patchify + normalise on the device, against the HF processor
(``inference/engine/pixels.py`` and its use in ``PromptBuilder.process_images`` and the runner).

The bar is bit-for-bit equality (not a tolerance): with the processor's ``pixel_values``, and
for the resize alone with Pillow's ``Image.resize``. The resize is a port of Pillow's integer
arithmetic and the normaliser's table is filled by the processor's own arithmetic, so any
difference is a bug. The CUDA tests run where a GPU is present (the device run of this
project) and are skipped elsewhere.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Glm4vImageProcessorPil, Glm46VImageProcessorPil

from inference.engine import pixels
from inference.engine.pixels import PatchExtractor, PixelNormalizer, lookup_torch, patchify
from inference.engine.prompt import (
    ProcessedImage,
    PromptBuilder,
    PromptError,
    decode_image,
    decode_pixels,
)
from tests.inference.conftest import chat_request, image_bytes

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
FILTER_NAMES = {1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _encoded(
    width: int, height: int, mode: str, fmt: str = "PNG", seed: int = 0, **save: Any
) -> bytes:
    """A noise image in ``mode`` (L, RGB, RGBA with varying alpha, P with a random palette,
    CMYK), saved with ``save`` options (such as ``transparency``)."""
    rng = np.random.default_rng(seed)
    if mode == "RGB" and not save:
        return image_bytes(width, height, seed=seed, fmt=fmt)
    channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    values = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), values.tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


# (width, height, mode, format, save options): tiny sizes below the processor's minimum
# (upscaled), odd sizes and aspect ratios, one that needs no resize, large ones, non-RGB
# modes, and transparency that the processor composites onto white.
CASES = [
    (28, 28, "RGB", "PNG", {}),
    (1, 1, "RGB", "PNG", {}),
    (56, 84, "RGB", "PNG", {}),
    (97, 203, "RGB", "PNG", {}),
    (5, 300, "RGB", "PNG", {}),
    (300, 2, "RGB", "PNG", {}),
    (224, 112, "RGB", "PNG", {}),
    (672, 672, "RGB", "PNG", {}),
    (672, 672, "RGB", "JPEG", {}),
    (1000, 750, "RGB", "JPEG", {}),
    (1344, 1000, "RGB", "JPEG", {}),
    (150, 37, "L", "PNG", {}),
    (123, 77, "RGBA", "PNG", {}),
    (64, 90, "P", "PNG", {}),
    (64, 90, "P", "PNG", {"transparency": 7}),
    (81, 45, "RGB", "PNG", {"transparency": (1, 2, 3)}),
    (77, 61, "CMYK", "JPEG", {}),
]
CASE_IDS = [f"{w}x{h}-{mode}-{fmt}{'-trns' if save else ''}" for w, h, mode, fmt, save in CASES]


@pytest.fixture(scope="module")
def builder(tiny_model_dir: Path) -> PromptBuilder:
    built = PromptBuilder.from_pretrained(str(tiny_model_dir), local_files_only=True)
    # Without this the tests below would compare the fallback path with itself.
    assert built.patch_extractor is not None, type(built.image_processor)
    return built


@pytest.fixture(scope="module")
def small_builder(builder: PromptBuilder) -> PromptBuilder:
    """A processor with a small ``longest_edge``: most images are scaled down, some > 4x."""
    processor = Glm46VImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 16}
    )
    built = PromptBuilder(builder.tokenizer, processor)
    assert built.patch_extractor is not None
    return built


def _one_image(builder: PromptBuilder, data: bytes) -> ProcessedImage:
    request = chat_request("r", "What is it?", images={"img": (1, 1)})
    [processed] = builder.process_images(request.messages, {"img": data}, scope="t")
    return processed


def _reference(builder: PromptBuilder, data: bytes) -> Any:
    return builder.image_processor(images=[decode_image(data)], return_tensors="pt")


def _random_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _pillow(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    resized = Image.fromarray(array).resize((width, height), resample, reducing_gap=None)
    return np.asarray(resized)


@pytest.mark.parametrize(("width", "height", "mode", "fmt", "save"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("which", ["default", "small"])
def test_split_path_equals_the_processor(
    builder, small_builder, which, width, height, mode, fmt, save
):
    used = builder if which == "default" else small_builder
    data = _encoded(width, height, mode, fmt, **save)
    reference = _reference(used, data)

    processed = _one_image(used, data)

    assert processed.extractor is not None
    assert processed.pixels.dtype == torch.uint8
    assert tuple(processed.pixels.shape) == (height, width, 3)  # decoded, not resized
    assert torch.equal(processed.grid_thw, reference["image_grid_thw"][0].to(torch.long))
    assert processed.tokens == int(reference["image_grid_thw"][0].prod()) // 4
    pixels = processed.model_pixels(device=torch.device("cpu"))
    assert pixels.dtype == torch.float32
    assert torch.equal(pixels, reference["pixel_values"])
    assert torch.equal(processed.pixel_values, reference["pixel_values"])


def test_the_small_processor_scales_down_by_more_than_four(small_builder):
    """The "small" cases above include real downscaling (else they would test nothing new)."""
    processed = _one_image(small_builder, _encoded(1344, 1000, "RGB", "JPEG"))
    _, grid_h, grid_w = processed.grid_thw.tolist()
    assert 1344 / (grid_w * 14) > 4 and 1000 / (grid_h * 14) > 4


def test_transparency_is_composited_onto_white_as_the_processor_does(builder):
    """An RGB image can carry a transparent colour (PNG tRNS); the processor's
    ``convert_to_rgb`` turns it white, so the decoded pixels must not be taken as they are."""
    array = np.random.default_rng(3).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    array[:10] = (1, 2, 3)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", transparency=(1, 2, 3))

    processed = _one_image(builder, buffer.getvalue())

    assert processed.pixels[:10].eq(255).all()
    assert torch.equal(
        processed.model_pixels(), _reference(builder, buffer.getvalue())["pixel_values"]
    )


def test_the_preprocessing_thread_only_decodes(builder, monkeypatch):
    """``process_images`` returns the decoded image and never resizes or patchifies; the
    device side does both, with neither of the processor's own steps."""
    processor = Glm46VImageProcessorPil()
    data = _encoded(97, 203, "RGB")
    reference = processor(images=[decode_image(data)], return_tensors="pt")
    fresh = PromptBuilder(builder.tokenizer, processor)
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"processor.{name} called")

        return step

    for name in ("resize", "patchify", "rescale", "normalize", "preprocess"):
        monkeypatch.setattr(processor, name, refuse(name))
    real_resize, real_patchify = pixels.pillow_resize, pixels.patchify
    monkeypatch.setattr(
        pixels, "pillow_resize", lambda *a, **k: calls.append("resize") or real_resize(*a, **k)
    )
    monkeypatch.setattr(
        pixels, "patchify", lambda *a, **k: calls.append("patchify") or real_patchify(*a, **k)
    )

    processed = _one_image(fresh, data)

    assert calls == []
    assert torch.equal(processed.pixels, torch.from_numpy(np.array(decode_image(data))))
    assert torch.equal(processed.model_pixels(), reference["pixel_values"])
    assert calls == ["resize", "patchify"]


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
    reference = _reference(builder, data)
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
        Glm46VImageProcessorPil(resample=Image.Resampling.BILINEAR),
        Glm46VImageProcessorPil(resample=Image.Resampling.LANCZOS),
        Glm46VImageProcessorPil(resample=Image.Resampling.BOX),
        Glm46VImageProcessorPil(resample=Image.Resampling.HAMMING),
        Glm4vImageProcessorPil(),
    ],
    ids=[
        "no-normalize",
        "no-rescale",
        "neither",
        "other-stats",
        "no-resize",
        "other-patch",
        "bilinear",
        "lanczos",
        "box",
        "hamming",
        "glm4v",
    ],
)
@pytest.mark.parametrize("size", [(112, 56), (97, 41), (900, 20)], ids=["exact", "up", "down"])
def test_processor_settings_are_followed(processor, size):
    extractor = PatchExtractor.for_processor(processor)
    assert extractor is not None
    width, height = size
    if not processor.do_resize and (width % 28 or height % 28):
        pytest.skip("do_resize=False needs sides that are multiples of patch * merge (28)")
    image = decode_image(_encoded(width, height, "RGB", seed=4))
    reference = processor(images=[image], return_tensors="pt")

    decoded, grid = extractor(image)

    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (height, width, 3)
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    assert torch.equal(extractor.model_pixels(decoded, grid), reference["pixel_values"])


@pytest.mark.parametrize(
    "resample", [Image.Resampling.NEAREST, Image.Resampling.MKS2013, Image.Resampling.MKS2021]
)
def test_filters_that_are_not_ported_take_the_full_processor(builder, resample):
    processor = Glm46VImageProcessorPil(resample=resample)
    assert PatchExtractor.for_processor(processor) is None
    fallback = PromptBuilder(builder.tokenizer, processor)
    data = _encoded(97, 203, "RGB")

    processed = _one_image(fallback, data)

    assert processed.extractor is None and processed.pixels.dtype == torch.float32
    reference = processor(images=[decode_image(data)], return_tensors="pt")
    assert torch.equal(processed.model_pixels(), reference["pixel_values"])


def test_a_processor_without_a_pillow_filter_is_left_to_the_processor():
    """``resample=None`` (which the processor's ``preprocess`` refuses) or a torchvision mode
    (which it maps to a Pillow filter itself): the split path does not guess."""
    assert PatchExtractor.for_processor(Glm46VImageProcessorPil(resample=None)) is None
    processor = Glm46VImageProcessorPil()
    processor.resample = "bicubic"
    assert PatchExtractor.for_processor(processor) is None


def test_a_pillow_whose_resize_is_not_reproduced_takes_the_full_processor(monkeypatch):
    monkeypatch.setattr(pixels, "resample_supported", lambda resample: False)
    assert PatchExtractor.for_processor(Glm46VImageProcessorPil()) is None
    # Without a resize the port is not needed.
    assert PatchExtractor.for_processor(Glm46VImageProcessorPil(do_resize=False)) is not None


def test_unknown_processor_falls_back_to_the_full_processor(builder):
    class CustomProcessor(Glm46VImageProcessorPil):
        """A subclass could change any step: the split path must not assume it did not."""

    processor = CustomProcessor()
    assert PatchExtractor.for_processor(processor) is None
    fallback = PromptBuilder(builder.tokenizer, processor)
    assert fallback.patch_extractor is None
    data = _encoded(97, 203, "RGB")

    processed = _one_image(fallback, data)

    assert processed.extractor is None and processed.pixels.dtype == torch.float32
    reference = processor(images=[decode_image(data)], return_tensors="pt")
    assert torch.equal(processed.model_pixels(), reference["pixel_values"])


def test_errors_of_the_processor_are_raised_in_the_preprocessing_thread(builder):
    """Where the processor refuses an image, ``process_images`` does (not the model runner)."""
    with pytest.raises(ValueError, match="aspect ratio"):
        _one_image(builder, _encoded(2, 600, "RGB"))
    with pytest.raises(ValueError, match="aspect ratio"):
        builder.image_processor(images=[decode_image(_encoded(2, 600, "RGB"))])
    no_resize = PatchExtractor.for_processor(Glm46VImageProcessorPil(do_resize=False))
    with pytest.raises(ValueError, match="multiple of 28"):
        no_resize(decode_image(_encoded(97, 41, "RGB")))


# ---------------------------------------------------------------------------- the resize
def test_patchify_has_the_processors_layout():
    processor = Glm46VImageProcessorPil()
    image = np.random.default_rng(1).integers(0, 256, (3, 56, 140), dtype=np.uint8)
    expected, grid_h, grid_w = processor.patchify(
        image, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    channels_last = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    patches = patchify(channels_last, patch_size=14, merge_size=2, temporal_patch_size=2)
    assert (grid_h, grid_w) == (4, 10)
    assert patches.dtype == torch.uint8 and patches.is_contiguous()
    assert tuple(patches.shape) == (40, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(patches.numpy().astype(np.float32), expected)


# ---------------------------------------------------------------------------- normaliser
@pytest.mark.parametrize("block_rows", [1, 7, 512, 10**9])
def test_cpu_lookup_blocks_do_not_change_the_result(monkeypatch, block_rows):
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
    reference = _reference(builder, data)
    processed = _one_image(builder, data)
    extractor = processed.extractor
    grid = tuple(processed.grid_thw.tolist())
    normalizer = extractor.normalizer
    table = normalizer.table.reshape(-1).to(dtype)

    values = lookup_torch(table, normalizer.offsets, extractor.patches(processed.pixels, grid))

    assert torch.equal(values, reference["pixel_values"].to(dtype))


def test_normalizer_refuses_what_it_cannot_normalise():
    normalizer = PixelNormalizer.from_image_processor(Glm46VImageProcessorPil())
    assert normalizer.columns == 3 * 2 * 14 * 14
    with pytest.raises(ValueError):
        normalizer(torch.zeros(4, normalizer.columns, dtype=torch.float32))
    with pytest.raises(ValueError):
        normalizer(torch.zeros(4, 100, dtype=torch.uint8))


# ---------------------------------------------------------------------------- engine use
def test_inference_mode_and_threads_do_not_change_the_result(builder):
    """The runner calls ``model_pixels`` under ``torch.inference_mode`` on its thread while
    preprocessing threads decode; caches filled in one mode serve the other."""
    datas = [_encoded(31 + 17 * i, 200 - 23 * i, "RGB", seed=i) for i in range(6)]
    references = [_reference(builder, data)["pixel_values"] for data in datas]
    with ThreadPoolExecutor(max_workers=3) as pool:
        processed = list(pool.map(lambda data: _one_image(builder, data), datas))
    results: dict[int, torch.Tensor] = {}
    lock = threading.Lock()

    def normalise(index: int) -> None:
        with torch.inference_mode(mode=index % 2 == 0):
            value = processed[index].model_pixels(device=torch.device("cpu"))
        with lock:
            results[index] = value

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(normalise, range(len(datas))))
        list(pool.map(normalise, reversed(range(len(datas)))))
    for index, reference in enumerate(references):
        assert torch.equal(results[index], reference), index


def test_runner_vision_input_equals_the_processor_output(tiny_runner):
    """The runner resizes and normalises on its device: the same image embeddings as from
    the processor's own pixel values, fed through the same runner (whatever its vision
    pass rounds like)."""
    data = _encoded(97, 203, "RGBA")
    request = chat_request("r", "What is it?", images={"img": (1, 1)})
    [processed] = tiny_runner.process_images(request.messages, {"img": data}, scope="t")
    assert processed.pixels.dtype == torch.uint8 and processed.pixels.shape[:2] == (203, 97)
    reference = tiny_runner.prompts.image_processor(
        images=[decode_image(data)], return_tensors="pt"
    )
    # The fallback form: the processor's float32 values, which the runner only casts.
    processor_made = dataclasses.replace(
        processed, key="reference", pixels=reference["pixel_values"], extractor=None
    )

    embeddings = []
    for image in (processed, processor_made):
        prompt = tiny_runner.build_prompt(request.messages, [image], thinking=False)
        [encoded] = tiny_runner.encode_images([prompt], None)
        embeddings.append(encoded.embeddings[0])

    assert torch.equal(embeddings[0], embeddings[1])


def test_the_pillow_processor_is_asked_for_even_where_torchvision_is_installed(
    tiny_model_dir, monkeypatch
):
    """A GPU host usually has torchvision, and transformers then picks the torchvision image
    processor unless told otherwise; the engine must get the Pillow one its split path
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


# ---------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize(("width", "height", "mode", "fmt", "save"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_path_on_cuda_equals_the_processor(
    builder, small_builder, width, height, mode, fmt, save, dtype
):
    device = torch.device("cuda")
    for used in (builder, small_builder):
        data = _encoded(width, height, mode, fmt, **save)
        reference = _reference(used, data)
        processed = _one_image(used, data)
        with torch.inference_mode():
            values = processed.model_pixels(device=device, dtype=dtype)
        assert values.device.type == "cuda" and values.dtype == dtype
        assert torch.equal(values.cpu(), reference["pixel_values"].to(dtype))


@needs_cuda
def test_uploads_from_pinned_memory_once_cuda_is_in_use(builder):
    torch.cuda.init()
    data = _encoded(672, 672, "RGB", "JPEG")
    reference = _reference(builder, data)["pixel_values"]
    processed = _one_image(builder, data)
    assert processed.pixels.is_pinned()
    # Many uploads in flight on the stream (non-blocking) before any result is read.
    outputs = [processed.model_pixels(device=torch.device("cuda")) for _ in range(8)]
    unpinned = ProcessedImage(
        key=processed.key,
        pixels=processed.pixels.clone(),  # pageable: pinned by model_pixels itself
        grid_thw=processed.grid_thw,
        tokens=processed.tokens,
        extractor=processed.extractor,
    )
    assert not unpinned.pixels.is_pinned()
    outputs.append(unpinned.model_pixels(device=torch.device("cuda")))
    torch.cuda.synchronize()
    for values in outputs:
        assert torch.equal(values.cpu(), reference)


def _validated_ppm(width: int, height: int, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A PPM as validation writes it (webplatform/uploads/validation.py), and its pixels."""
    pixels_hwc = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return b"P6\n%d %d\n255\n" % (width, height) + pixels_hwc.tobytes(), pixels_hwc


@pytest.mark.parametrize("size", [(520, 520), (97, 203), (1, 1)])
def test_a_validated_ppm_is_taken_as_its_pixels_and_processed_as_pillow_decodes_it(builder, size):
    data, expected = _validated_ppm(*size)
    view = decode_pixels(data)
    assert isinstance(view, np.ndarray) and not view.flags.writeable  # no copy was made
    assert np.array_equal(view, expected)
    assert np.array_equal(np.asarray(decode_image(data)), expected)  # what Pillow reads
    # The whole preprocessing of the fast path against the processor on Pillow's image.
    processor = Glm46VImageProcessorPil()
    reference = processor(images=[decode_image(data)], return_tensors="pt")
    processed = _one_image(PromptBuilder(builder.tokenizer, processor), data)
    assert torch.equal(processed.model_pixels(), reference["pixel_values"])


@pytest.mark.parametrize(
    "data",
    [
        b"P6\n2 2\n255\n" + bytes(11),  # one byte short: Pillow decides (and refuses)
        b"P6\n2 2\n255\n" + bytes(13),  # one byte over
        b"P6 2 2 255\n" + bytes(12),  # another writer's whitespace
        b"P6\n# a comment\n2 2\n255\n" + bytes(12),
        b"P6\n02 2\n255\n" + bytes(12),
    ],
)
def test_any_other_ppm_goes_through_pillow(data):
    try:
        decoded = decode_pixels(data)
    except PromptError:
        return  # Pillow refused it: never taken as pixels
    assert not isinstance(decoded, np.ndarray)
