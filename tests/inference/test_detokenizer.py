"""Incremental detokenizer, stop strings and the reasoning split, on real byte-level BPE.

The detokenizer has two implementations of one rule (Rust ``DecodeStream`` for fast
tokenizers, a Python window decode otherwise): the stream tests run on both (``decoded_by``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from inference.engine.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    OutputStream,
    StopStringFilter,
)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE with no merges: every CJK character is three tokens, an emoji four."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class DecodeOnly:
    """A tokenizer seen through ``decode`` alone, as one without a Rust backend looks."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self._tokenizer.decode(ids, **kwargs)


@pytest.fixture(params=["decode_stream", "window"])
def decoded_by(request) -> Callable[[Any], Any]:
    """What the detokenizer gets: the fast tokenizer itself, or the decode-only view of it."""
    if request.param == "decode_stream":
        return lambda tokenizer: tokenizer
    return DecodeOnly


TEXTS = [
    "图片里有一只红色的猫坐在桌子上。",
    "Mixed 中文 and English, 龙凤呈祥! 😀 emoji 🐈‍⬛ end",
    "天气很好，我们去公园散步吧。",
]


def _stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_never_split(byte_tokenizer, decoded_by, text):
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # really one token per byte
    pieces, tail = _stream(decoded_by(byte_tokenizer), ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + tail == text


def test_character_released_when_its_last_byte_arrives(byte_tokenizer, decoded_by):
    ids = byte_tokenizer("图a", add_special_tokens=False)["input_ids"]
    pieces, tail = _stream(decoded_by(byte_tokenizer), ids)
    assert pieces == ["", "", "图", "a"]
    assert tail == ""


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_stream_equals_final_decode(tiny_tokenizer, decoded_by, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # The tiny tokenizer splits some characters over several tokens too.
    assert any(REPLACEMENT_CHAR in tiny_tokenizer.decode([i]) for i in ids)
    pieces, tail = _stream(decoded_by(tiny_tokenizer), ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + tail == tiny_tokenizer.decode(ids) == text


def test_truncated_character_is_only_released_by_flush(byte_tokenizer, decoded_by):
    ids = byte_tokenizer("猫", add_special_tokens=False)["input_ids"][:2]
    pieces, tail = _stream(decoded_by(byte_tokenizer), ids)
    assert pieces == ["", ""]
    assert tail == byte_tokenizer.decode(ids)  # what a full decode shows: U+FFFD


def test_flush_starts_afresh(tiny_tokenizer, decoded_by):
    cat, sits = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("猫", "坐"))
    assert len(cat) > 1  # a character split over tokens
    detok = IncrementalDetokenizer(decoded_by(tiny_tokenizer))
    assert "".join(detok.push(i) for i in cat[:-1]) == ""
    assert detok.flush() == tiny_tokenizer.decode(cat[:-1])
    assert "".join(detok.push(i) for i in sits) + detok.flush() == "坐"


def _random_ids(rng: random.Random, tokenizer, texts: list[list[int]], specials: list[int]):
    """Runs of real text (cut at any token, so mid-character), random ids and special tokens."""
    ids: list[int] = []
    while len(ids) < 40:
        kind = rng.random()
        if kind < 0.5:
            text = rng.choice(texts)
            start = rng.randrange(len(text))
            ids += text[start : start + rng.randrange(1, 12)]
        elif kind < 0.8:
            ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 4))]
        else:
            ids.append(rng.choice(specials))
    return ids


def test_random_sequences_stream_equals_final_decode(tiny_tokenizer):
    """Both implementations give the same chunks, none of them ending mid-character; their
    concatenation with ``flush()`` is the full decode, even for invalid UTF-8 byte runs."""
    texts = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    specials = [i for i, t in tiny_tokenizer.added_tokens_decoder.items() if t.special]
    assert len(specials) > 10  # every GLM special token, skipped by the decode
    rng = random.Random(0)
    for _ in range(200):
        ids = _random_ids(rng, tiny_tokenizer, texts, specials)
        full = tiny_tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        fast = IncrementalDetokenizer(tiny_tokenizer)
        window = IncrementalDetokenizer(DecodeOnly(tiny_tokenizer))
        emitted = ""
        for n, token in enumerate(ids, start=1):
            piece = fast.push(token)
            assert piece == window.push(token), ids
            assert not piece.endswith(REPLACEMENT_CHAR), ids
            emitted += piece
            assert tiny_tokenizer.decode(ids[:n], skip_special_tokens=True).startswith(emitted)
        tail = fast.flush()
        assert tail == window.flush()
        assert emitted + tail == full, ids


def test_fast_tokenizer_push_makes_no_python_decode(tiny_tokenizer, monkeypatch):
    calls = []
    decode = tiny_tokenizer.decode
    monkeypatch.setattr(
        tiny_tokenizer, "decode", lambda *args, **kwargs: calls.append(1) or decode(*args, **kwargs)
    )
    text = TEXTS[1]
    pieces, tail = _stream(
        tiny_tokenizer, tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    assert "".join(pieces) + tail == text
    assert calls == []


def _wrap(rust_tokenizer, cls=None):
    from transformers import PreTrainedTokenizerFast

    return (cls or PreTrainedTokenizerFast)(tokenizer_object=rust_tokenizer)


def test_fast_tokenizer_with_its_own_decode_keeps_it(byte_tokenizer):
    from transformers import PreTrainedTokenizerFast

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = _wrap(byte_tokenizer.backend_tokenizer, Shouting)
    pieces, tail = _stream(
        shouting, byte_tokenizer("猫 sat", add_special_tokens=False)["input_ids"]
    )
    assert "".join(pieces) + tail == "猫 SAT"


def test_window_decode_takes_over_where_decode_stream_refuses():
    """Byte-fallback tokens that are not UTF-8 change how the bytes before them decode, so
    ``DecodeStream`` raises "invalid prefix"; the stream goes on as the window decode would
    (neither equals the full decode there: a byte-level BPE such as GLM's has no such case)."""
    from tokenizers import Tokenizer, decoders, models

    rust = Tokenizer(
        models.WordLevel(vocab={"<unk>": 0, "<0x41>": 1, "<0x80>": 2, "b": 3}, unk_token="<unk>")
    )
    rust.decoder = decoders.ByteFallback()
    tokenizer = _wrap(rust)
    ids = [1, 2, 3, 1]  # "A", a lone continuation byte, "b", "A"
    fast, fast_tail = _stream(tokenizer, ids)
    window, window_tail = _stream(DecodeOnly(tokenizer), ids)
    assert (fast, fast_tail) == (window, window_tail) == (["A", "", "\ufffdb", "A"], "")


def test_stop_string_cut_and_never_emitted():
    stop = StopStringFilter(["STOP", "\n\n"])
    out = [stop.feed(t) for t in ["Hello S", "T", "OP there"]]
    assert out == ["Hello ", "", ""]
    assert stop.stopped
    assert stop.flush() == ""


def test_stop_string_prefix_held_then_released():
    stop = StopStringFilter(["STOP"])
    assert stop.feed("go ST") == "go "  # "ST" might begin STOP
    assert stop.feed("ART") == "START"  # it did not
    assert stop.feed("S") == ""
    assert stop.flush() == "S"  # stream ended: the held tail is plain text
    assert not stop.stopped


def test_earliest_stop_string_wins():
    stop = StopStringFilter(["world", "lo"])
    assert stop.feed("hello world") == "hel"


def test_reasoning_split_and_stop_applies_to_answer_only(tiny_tokenizer, decoded_by):
    think_start = tiny_tokenizer.convert_tokens_to_ids("<think>")
    think_end = tiny_tokenizer.convert_tokens_to_ids("</think>")

    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    reasoning_ids = ids("我仔细看 the cat.")
    answer_ids = ids("一只猫 sits. cat")
    sequence = [think_start, *reasoning_ids, think_end, *answer_ids]
    stream = OutputStream(
        decoded_by(tiny_tokenizer),
        stop=["cat"],
        think_start_id=think_start,
        think_end_id=think_end,
    )
    deltas = [stream.push(t) for t in sequence]
    deltas.append(stream.finish())
    assert "".join(d.reasoning for d in deltas) == "我仔细看 the cat."  # no stop in reasoning
    assert "".join(d.text for d in deltas) == "一只猫 sits. "
    assert stream.stopped
    assert stream.reasoning_tokens == len(reasoning_ids) + 2  # tags included
    assert all(REPLACEMENT_CHAR not in d.text + d.reasoning for d in deltas)


def test_prompt_opened_think_starts_in_reasoning(tiny_tokenizer, decoded_by):
    think_end = tiny_tokenizer.convert_tokens_to_ids("</think>")
    body = tiny_tokenizer("ok", add_special_tokens=False)["input_ids"]
    stream = OutputStream(decoded_by(tiny_tokenizer), think_end_id=think_end, in_reasoning=True)
    deltas = [stream.push(t) for t in [*body, think_end, *body]] + [stream.finish()]
    assert "".join(d.reasoning for d in deltas) == "ok"
    assert "".join(d.text for d in deltas) == "ok"
