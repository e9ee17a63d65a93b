"""Tests for inference/ocr_lite: date reading, answers, the engine's events, and the real OCR
model end to end on an image rendered with Pillow."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import msgspec
import pytest
from PIL import Image, ImageDraw, ImageFont

from inference.engine.config import EngineStats
from inference.ocr_lite import OcrLiteEngine, ocr_lite_engine_from_spec
from inference.ocr_lite.answers import ImageText, best_matching_line, compose_answer, count_words
from inference.ocr_lite.dates import (
    DateKind,
    describe_relative,
    find_dates,
    is_expiry_question,
    pick_expiry,
    relative_to,
)
from inference.ocr_lite.ocr import OcrLine, OcrReader
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    Event,
    FinishReason,
    ImagePart,
    ImageRef,
    InferenceRequest,
    Message,
    SamplingParams,
    StartEvent,
    TextPart,
)

TODAY = dt.date(2025, 11, 25)


# -- dates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "month_only"),
    [
        ("2025-03-14", "2025-03-14", False),
        ("2025/3/14", "2025-03-14", False),
        ("20250314", "2025-03-14", False),
        ("14/03/2025", "2025-03-14", False),
        ("14.03.2025", "2025-03-14", False),
        ("14-03-25", "2025-03-14", False),
        ("03/14/2025", "2025-03-14", False),  # no month 14: read month first
        ("03/04/2025", "2025-04-03", False),  # ambiguous: day first
        ("14 Mar 2025", "2025-03-14", False),
        ("14MAR2025", "2025-03-14", False),
        ("Mar 14 2025", "2025-03-14", False),
        ("March 14th, 2025", "2025-03-14", False),
        ("2025年3月14日", "2025-03-14", False),
        ("MAR 2025", "2025-03", True),
        ("03/2025", "2025-03", True),
        ("2025.03", "2025-03", True),
        ("2025年2月", "2025-02", True),
    ],
)
def test_find_dates_reads_each_format(text: str, expected: str, month_only: bool) -> None:
    [found] = find_dates(f"LOT 42 {text} L7")
    assert found.iso() == expected
    assert found.month_only is month_only


def test_month_only_date_means_the_end_of_the_month() -> None:
    [found] = find_dates("EXP 02/2024")
    assert found.date == dt.date(2024, 2, 29)


@pytest.mark.parametrize("text", ["2024-02-30", "31/02/2025", "2025年2月30日", "TOTAL 12.50"])
def test_impossible_dates_and_prices_are_not_dates(text: str) -> None:
    assert find_dates(text) == []


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("EXP 2025-03-14", DateKind.EXPIRY),
        ("Expiry date: 14/03/2025", DateKind.EXPIRY),
        ("BB 14MAR25", DateKind.BEST_BEFORE),
        ("Best before end\n03/2026", DateKind.BEST_BEFORE),
        ("USE BY 14.03.2025", DateKind.USE_BY),
        ("有效期至2025年3月14日", DateKind.EXPIRY),
        ("生产日期：2024年03月01日", DateKind.PRODUCTION),
        ("PRODUCT OF ITALY 14/03/2025", None),
    ],
)
def test_labels_before_a_date_are_recognised(text: str, label: DateKind | None) -> None:
    [found] = find_dates(text)
    assert found.label is label


def test_pick_expiry_prefers_the_labelled_date_then_the_latest_bare_one() -> None:
    labelled = pick_expiry(find_dates("MFG 2024-06-01 EXP 2024-12-01 PACKED 2024-06-02"))
    assert labelled is not None and labelled.iso() == "2024-12-01"
    bare = pick_expiry(find_dates("2026-01-10 2024-06-01"))
    assert bare is not None and bare.iso() == "2026-01-10"
    assert pick_expiry(find_dates("MFG 2024-06-01")) is None


def test_passed_and_not_passed_against_a_fixed_today() -> None:
    assert describe_relative(relative_to(dt.date(2025, 3, 14), TODAY)) == (
        "it has passed (256 days ago)"
    )
    assert describe_relative(relative_to(dt.date(2025, 12, 7), TODAY)) == (
        "it has not passed yet (12 days left)"
    )
    assert describe_relative(relative_to(dt.date(2025, 11, 24), TODAY)) == (
        "it has passed (1 day ago)"
    )
    assert not relative_to(TODAY, TODAY).passed  # good until the end of the day


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("When does this expire?", True),
        ("What is the best before date?", True),
        ("Is it still good to eat?", True),
        ("这个过期了吗？", True),
        ("What is the total?", False),
        ("What does the sign say?", False),
    ],
)
def test_expiry_questions_are_recognised(question: str, expected: bool) -> None:
    assert is_expiry_question(question) is expected


# -- answers ------------------------------------------------------------------------------


def test_expiry_answer_names_the_date_and_says_it_has_passed() -> None:
    images = [ImageText(("MILK 1L", "EXP 14/03/2025"))]
    answer = compose_answer("Is this milk expired?", images, TODAY)
    assert answer.startswith("The expiry date is 2025-03-14; it has passed (256 days ago).")
    assert '"EXP 14/03/2025"' in answer


def test_expiry_answer_says_not_passed_and_keeps_the_label_kind() -> None:
    images = [ImageText(("BEST BEFORE 07 DEC 2025",))]
    answer = compose_answer("When does it expire?", images, TODAY)
    assert answer.startswith("The best-before date is 2025-12-07; it has not passed yet (12 days")


def test_expiry_answer_for_a_month_only_date() -> None:
    answer = compose_answer("expiry?", [ImageText(("EXP 12/2025",))], TODAY)
    assert "2025-12 (month only, read as the end of the month, 2025-12-31)" in answer
    assert "it has not passed yet (36 days left)" in answer


def test_chinese_question_gets_a_chinese_expiry_answer() -> None:
    images = [ImageText(("生产日期：2024年03月01日", "有效期至2025年3月14日"))]
    answer = compose_answer("这个过期了吗？", images, TODAY)
    assert answer.startswith("有效期至 2025-03-14，已过期（256 天前）。")


def test_expiry_question_without_a_date_lists_the_text() -> None:
    answer = compose_answer("When does it expire?", [ImageText(("HELLO", "WORLD"))], TODAY)
    assert answer == (
        "I could not find an expiry date in the image.\n\nText found in the image:\nHELLO\nWORLD"
    )


def test_other_questions_get_the_text_and_the_matching_line() -> None:
    images = [ImageText(("CORNER SHOP", "MILK 1.20", "TOTAL 12.50"))]
    answer = compose_answer("What is the total?", images, TODAY)
    assert answer == (
        'The line that matches your question: "TOTAL 12.50".\n\n'
        "Text found in the image:\nCORNER SHOP\nMILK 1.20\nTOTAL 12.50"
    )
    assert best_matching_line("What colour is the sky?", images[0].lines) is None


def test_a_text_only_question_is_told_that_no_image_was_given() -> None:
    answer = compose_answer("What is the expiry date?", [], TODAY)
    assert answer.startswith("No image was given.")
    assert "OCR" in answer


def test_words_are_counted_with_each_chinese_character_as_one() -> None:
    assert count_words("EXP 2024-01-31, it has passed.") == 5
    assert count_words("有效期 2025") == 4


# -- the engine, with a stand-in reader (no OCR model) -------------------------------------


class _FixedReader(OcrReader):
    """Returns the given lines for any image, counting the reads."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines
        self.reads = 0

    def read(self, data: bytes) -> list[OcrLine]:
        self.reads += 1
        return [OcrLine(text, 0.99, float(i), 0.0) for i, text in enumerate(self.lines)]


def _png(text_lines: list[str], size: tuple[int, int] = (640, 260)) -> bytes:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=44)  # scalable (FreeType) since Pillow 10.1
    for i, line in enumerate(text_lines):
        draw.text((24, 24 + i * 76), line, fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _request(
    question: str,
    images: Sequence[bytes] = (),
    *,
    request_id: str = "req_1",
    tenant_id: str = "tenant_a",
    sampling: SamplingParams | None = None,
) -> tuple[InferenceRequest, dict[str, bytes]]:
    store = {hashlib.sha256(data).hexdigest(): data for data in images}
    parts: list[TextPart | ImagePart] = [ImagePart(ImageRef(sha, 640, 260)) for sha in store]
    parts.append(TextPart(question))
    request = InferenceRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        model="ocr-lite",
        messages=[Message(role="user", content=parts)],
        sampling=sampling or SamplingParams(),
    )
    return request, store


def _run(engine: OcrLiteEngine, limit: int = 50) -> list[tuple[str, Event]]:
    events: list[tuple[str, Event]] = []
    for _ in range(limit):
        if not engine.has_unfinished():
            return events
        events.extend(engine.step())
    raise AssertionError("engine did not finish")


def _answer(events: list[tuple[str, Event]], request_id: str = "req_1") -> str:
    return "".join(e.text for rid, e in events if rid == request_id and isinstance(e, DeltaEvent))


def test_engine_streams_start_deltas_and_done_with_word_usage() -> None:
    engine = OcrLiteEngine(_FixedReader(["MILK 1L", "EXP 14/03/2025"]), today=lambda: TODAY)
    request, images = _request("Is this expired?", [b"png"])
    engine.add_request(request, images)
    events = [event for _, event in _run(engine)]

    assert isinstance(events[0], StartEvent) and events[0].prompt_tokens == 3
    deltas = [event for event in events if isinstance(event, DeltaEvent)]
    assert len(deltas) >= 2
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason is FinishReason.STOP
    answer = "".join(delta.text for delta in deltas)
    assert answer.startswith("The expiry date is 2025-03-14; it has passed (256 days ago).")
    assert done.usage.completion_tokens == count_words(answer) == sum(d.tokens for d in deltas)
    assert done.usage.prompt_tokens == 3
    assert not engine.has_unfinished() and engine.stats().running == 0


def test_engine_honours_max_tokens_and_stop_strings() -> None:
    engine = OcrLiteEngine(_FixedReader(["EXP 14/03/2025"]), today=lambda: TODAY)
    request, images = _request("expiry?", [b"png"], sampling=SamplingParams(max_tokens=3))
    engine.add_request(request, images)
    events = _run(engine)
    assert _answer(events).strip() == "The expiry date"
    done = events[-1][1]
    assert isinstance(done, DoneEvent) and done.finish_reason is FinishReason.LENGTH
    assert done.usage.completion_tokens == 3

    request, images = _request("expiry?", [b"png"], sampling=SamplingParams(stop=[";"]))
    engine.add_request(request, images)
    events = _run(engine)
    assert _answer(events) == "The expiry date is 2025-03-14"


def test_abort_before_start_and_mid_stream_finish_as_cancelled() -> None:
    reader = _FixedReader(["TOTAL 12.50"] * 20)
    engine = OcrLiteEngine(reader, today=lambda: TODAY)
    first, images = _request("What is the total?", [b"png"], request_id="req_1")
    second, _ = _request("What is the total?", [b"png"], request_id="req_2")
    engine.add_request(first, images)
    engine.add_request(second, images)
    engine.abort("req_2")
    step = engine.step()
    rid, done = step[0]
    assert rid == "req_2" and isinstance(done, DoneEvent)
    assert done.finish_reason is FinishReason.CANCELLED and done.usage.completion_tokens == 0
    assert [type(e) for rid, e in step if rid == "req_1"] == [StartEvent, DeltaEvent]

    engine.abort("req_1")
    engine.abort("req_unknown")  # ignored
    [(rid, done)] = engine.step()
    assert rid == "req_1" and isinstance(done, DoneEvent)
    assert done.finish_reason is FinishReason.CANCELLED
    assert done.usage.completion_tokens > 0
    assert not engine.has_unfinished()
    assert reader.reads == 1


def test_no_more_than_max_batch_size_answers_stream_at_once() -> None:
    engine = OcrLiteEngine(_FixedReader(["TOTAL 12.50"]), today=lambda: TODAY, max_batch_size=1)
    for request_id in ("req_1", "req_2"):
        request, images = _request("What is the total?", [b"png"], request_id=request_id)
        engine.add_request(request, images)
    events = _run(engine)
    order = [rid for rid, event in events if isinstance(event, StartEvent | DoneEvent)]
    assert order == ["req_1", "req_1", "req_2", "req_2"]
    assert engine.stats().max_batch_size == 1


def test_abort_while_the_image_is_read_and_a_passed_deadline() -> None:
    engine: OcrLiteEngine

    class AbortingReader(_FixedReader):
        def read(self, data: bytes) -> list[OcrLine]:
            engine.abort("req_1")  # as another thread would, mid-OCR
            return super().read(data)

    engine = OcrLiteEngine(AbortingReader(["TOTAL 1"]), today=lambda: TODAY)
    request, images = _request("total?", [b"png"])
    engine.add_request(request, images)
    [(_, done)] = engine.step()
    assert isinstance(done, DoneEvent) and done.finish_reason is FinishReason.CANCELLED

    late, images = _request("total?", [b"png"], request_id="req_2")
    engine.add_request(msgspec.structs.replace(late, deadline=time.time() - 1), images)
    [(_, error)] = engine.step()
    assert isinstance(error, ErrorEvent) and error.code is ErrorCode.TIMEOUT


def test_text_only_question_is_answered_without_reading_anything() -> None:
    reader = _FixedReader([])
    engine = OcrLiteEngine(reader, today=lambda: TODAY)
    request, images = _request("What is the expiry date?")
    engine.add_request(request, images)
    assert _answer(_run(engine)).startswith("No image was given.")
    assert reader.reads == 0


def test_missing_image_duplicate_id_and_undecodable_image() -> None:
    engine = OcrLiteEngine(OcrReader(), today=lambda: TODAY)
    request, _ = _request("expiry?", [b"png"])
    engine.add_request(request, {})
    with pytest.raises(ValueError):
        engine.add_request(request, {})
    [(_, error)] = engine.step()
    assert isinstance(error, ErrorEvent) and error.code is ErrorCode.IMAGE_UNAVAILABLE

    request, images = _request("expiry?", [b"not an image"])
    engine.add_request(request, images)
    [(_, error)] = engine.step()
    assert isinstance(error, ErrorEvent) and error.code is ErrorCode.INVALID_REQUEST
    assert error.message == "cannot decode image"  # Pillow's words go to the log
    assert not engine.has_unfinished()
    assert not engine.reader.loaded  # decoding failed before the model was needed


def test_ocr_results_are_cached_per_tenant() -> None:
    reader = _FixedReader(["EXP 14/03/2025"])
    engine = OcrLiteEngine(reader, today=lambda: TODAY)
    for request_id, tenant in [("req_1", "tenant_a"), ("req_2", "tenant_a"), ("req_3", "b")]:
        request, images = _request("expiry?", [b"png"], request_id=request_id, tenant_id=tenant)
        engine.add_request(request, images)
    _run(engine)
    assert reader.reads == 2


def test_spec_factory() -> None:
    engine = ocr_lite_engine_from_spec({"kind": "ocr-lite", "threads": 1, "timezone": "UTC"})
    assert engine.reader.threads == 1 and not engine.reader.loaded
    assert engine.stats().device == "cpu"
    with pytest.raises(ValueError):
        ocr_lite_engine_from_spec({"kind": "glm4v"})
    with pytest.raises(ValueError):
        ocr_lite_engine_from_spec({"kind": "ocr-lite", "timezone": "Mars/Olympus"})


def test_stats_are_the_engines_own_type_without_torch() -> None:
    """The heartbeat reads one ``EngineStats`` from every engine kind; ocr-lite returns that
    very type and, for it, loads no torch (a fresh interpreter, so nothing else did)."""
    assert type(OcrLiteEngine(OcrReader()).stats()) is EngineStats
    code = (
        "import sys; from inference.ocr_lite import OcrLiteEngine; "
        "from inference.ocr_lite.ocr import OcrReader; "
        "OcrLiteEngine(OcrReader()).stats(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- end to end with the real OCR model -----------------------------------------------------


@pytest.fixture(scope="module")
def reader() -> Iterator[OcrReader]:
    shared = OcrReader(threads=1)
    shared.load()
    yield shared


def test_end_to_end_reads_the_expiry_date_from_a_rendered_image(reader: OcrReader) -> None:
    engine = OcrLiteEngine(reader, today=lambda: TODAY)
    png = _png(["MILK 1L", "TOTAL 12.50", "EXP 2024-01-31"])
    expiry, images = _request("What is the expiry date? Has it passed?", [png])
    total, _ = _request("What is the total?", [png], request_id="req_2")
    engine.add_request(expiry, images)
    engine.add_request(total, images)
    events = _run(engine)

    answer = _answer(events)
    assert "2024-01-31" in answer
    assert "it has passed (664 days ago)" in answer
    assert 'The line that matches your question: "TOTAL 12.50"' in _answer(events, "req_2")
    assert [type(e) for rid, e in events if rid == "req_1"][0] is StartEvent
    assert isinstance(events[-1][1], DoneEvent)
