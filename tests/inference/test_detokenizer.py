"""Incremental detokenizer, stop strings and the reasoning split, on real byte-level BPE."""

from __future__ import annotations

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
def test_multibyte_characters_never_split(byte_tokenizer, text):
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # really one token per byte
    pieces, tail = _stream(byte_tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + tail == text


def test_character_released_when_its_last_byte_arrives(byte_tokenizer):
    ids = byte_tokenizer("图a", add_special_tokens=False)["input_ids"]
    pieces, tail = _stream(byte_tokenizer, ids)
    assert pieces == ["", "", "图", "a"]
    assert tail == ""


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_stream_equals_final_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # The tiny tokenizer splits some characters over several tokens too.
    assert any(REPLACEMENT_CHAR in tiny_tokenizer.decode([i]) for i in ids)
    pieces, tail = _stream(tiny_tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) + tail == tiny_tokenizer.decode(ids) == text


def test_truncated_character_is_only_released_by_flush(byte_tokenizer):
    ids = byte_tokenizer("猫", add_special_tokens=False)["input_ids"][:2]
    pieces, tail = _stream(byte_tokenizer, ids)
    assert pieces == ["", ""]
    assert tail == byte_tokenizer.decode(ids)  # what a full decode shows: U+FFFD


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


def test_reasoning_split_and_stop_applies_to_answer_only(tiny_tokenizer):
    think_start = tiny_tokenizer.convert_tokens_to_ids("<think>")
    think_end = tiny_tokenizer.convert_tokens_to_ids("</think>")

    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    reasoning_ids = ids("我仔细看 the cat.")
    answer_ids = ids("一只猫 sits. cat")
    sequence = [think_start, *reasoning_ids, think_end, *answer_ids]
    stream = OutputStream(
        tiny_tokenizer, stop=["cat"], think_start_id=think_start, think_end_id=think_end
    )
    deltas = [stream.push(t) for t in sequence]
    deltas.append(stream.finish())
    assert "".join(d.reasoning for d in deltas) == "我仔细看 the cat."  # no stop in reasoning
    assert "".join(d.text for d in deltas) == "一只猫 sits. "
    assert stream.stopped
    assert stream.reasoning_tokens == len(reasoning_ids) + 2  # tags included
    assert all(REPLACEMENT_CHAR not in d.text + d.reasoning for d in deltas)


def test_prompt_opened_think_starts_in_reasoning(tiny_tokenizer):
    think_end = tiny_tokenizer.convert_tokens_to_ids("</think>")
    body = tiny_tokenizer("ok", add_special_tokens=False)["input_ids"]
    stream = OutputStream(tiny_tokenizer, think_end_id=think_end, in_reasoning=True)
    deltas = [stream.push(t) for t in [*body, think_end, *body]] + [stream.finish()]
    assert "".join(d.reasoning for d in deltas) == "ok"
    assert "".join(d.text for d in deltas) == "ok"
