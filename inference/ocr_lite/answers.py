"""Turning the question and the text read from the images into an answer.

This is rule-based, not a language model: an expiry / best-before / use-by question gets the
date found and whether it has passed; any other question gets the text found, with the line
that shares the most keywords with the question quoted first when there is one. A question
with Chinese characters gets the fixed phrases in Chinese.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

from inference.ocr_lite.dates import (
    DateKind,
    FoundDate,
    describe_relative,
    find_dates,
    is_expiry_question,
    pick_expiry,
    question_kind,
    relative_to,
)

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_PIECE_RE = re.compile(rf"(?:[{_CJK}]|[^\s{_CJK}]+)\s*")


def count_words(text: str) -> int:
    """Our stand-in for a token count: each CJK character is one, so is each other run of
    non-space characters (``EXP 2024-01-31.`` counts 2)."""
    return len(_WORD_RE.findall(text))


def split_words(text: str) -> list[str]:
    """``text`` cut into counted words, each keeping its trailing whitespace, so that
    ``"".join(split_words(t)) == t.lstrip()``."""
    return _PIECE_RE.findall(text)


def is_chinese(text: str) -> bool:
    return re.search(rf"[{_CJK}]", text) is not None


@dataclass(frozen=True)
class ImageText:
    """The text lines read from one image, top to bottom."""

    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


_KIND_NAME = {
    DateKind.EXPIRY: ("expiry", "有效期至"),
    DateKind.BEST_BEFORE: ("best-before", "最佳食用日期"),
    DateKind.USE_BY: ("use-by", "使用截止日期"),
}

_STOPWORDS = frozenset(
    """a an and any are as at be can could did do does for from give how i image in is it
    its me my of on or picture photo please say says show tell that the there this to was
    what whats when where which who why with written you your read text see""".split()
)
_CJK_STOP_BIGRAMS = frozenset(
    "什么 是什 么是 图片 图中 图上 片上 片中 这个 这张 那个 多少 上面 里面 请问 哪些 一下 告诉 写的 写了".split()
)


def _keywords(question: str) -> tuple[list[str], list[str]]:
    words = [w for w in re.findall(r"[a-z0-9]+", question.lower()) if len(w) > 1]
    latin = [w for w in dict.fromkeys(words) if w not in _STOPWORDS]
    bigrams: list[str] = []
    for run in re.findall(rf"[{_CJK}]{{2,}}", question):
        bigrams.extend(run[i : i + 2] for i in range(len(run) - 1))
    cjk = [b for b in dict.fromkeys(bigrams) if b not in _CJK_STOP_BIGRAMS]
    return latin, cjk


def best_matching_line(question: str, lines: Sequence[str]) -> str | None:
    """The line sharing the most keywords with the question, if one clearly does.

    A Latin keyword matches at the start of a word (``total`` matches ``TOTAL:``, ``price``
    matches ``prices``); Chinese text is matched by character pairs. On a tie the line
    higher up wins.
    """
    latin, cjk = _keywords(question)
    if not latin and not cjk:
        return None
    best: str | None = None
    best_score = 0
    for line in lines:
        lowered = line.lower()
        score = sum(1 for w in latin if re.search(rf"(?<![a-z0-9]){re.escape(w)}", lowered))
        score += sum(1 for b in cjk if b in line)
        if score > best_score:
            best, best_score = line, score
    return best


def _listing(images: Sequence[ImageText], chinese: bool) -> str:
    header = "图片中识别到的文字：" if chinese else "Text found in the image:"
    if len(images) == 1:
        return f"{header}\n{images[0].text}"
    parts = [header]
    for number, image in enumerate(images, start=1):
        body = image.text or ("（无文字）" if chinese else "(no text)")
        parts.append(f"{'图片' if chinese else 'Image'} {number}:\n{body}")
    return "\n".join(parts)


def _located(images: Sequence[ImageText]) -> list[tuple[FoundDate, str]]:
    """Every date in every image, with the OCR line it was read from."""
    found = []
    for image in images:
        text = image.text
        for date in find_dates(text):
            line = text[: date.start].count("\n")
            found.append((date, image.lines[line]))
    return found


def _expiry_answer(
    question: str, images: Sequence[ImageText], today: dt.date, chinese: bool
) -> str:
    located = _located(images)
    expiry = pick_expiry([date for date, _ in located])
    if expiry is None:
        if chinese:
            intro = "没有在图片文字中找到有效期。"
        else:
            name = _KIND_NAME[question_kind(question)][0]
            article = "an" if name[0] in "aeiou" else "a"
            intro = f"I could not find {article} {name} date in the image."
        return f"{intro}\n\n{_listing(images, chinese)}"

    line = next(line for date, line in located if date is expiry)
    label = expiry.label
    kind = label if label is not None and label in _KIND_NAME else question_kind(question)
    english_name, chinese_name = _KIND_NAME[kind]
    relation = describe_relative(relative_to(expiry.date, today), chinese=chinese)
    if chinese:
        note = f"（只有月份，按月底 {expiry.date.isoformat()} 计算）" if expiry.month_only else ""
        return f"{chinese_name} {expiry.iso()}{note}，{relation}。\n识别自文字：“{line}”。"
    note = (
        f" (month only, read as the end of the month, {expiry.date.isoformat()})"
        if expiry.month_only
        else ""
    )
    return (
        f"The {english_name} date is {expiry.iso()}{note}; {relation}.\n"
        f'Read from the text: "{line}".'
    )


def _general_answer(question: str, images: Sequence[ImageText], chinese: bool) -> str:
    lines = [line for image in images for line in image.lines]
    parts = []
    match = best_matching_line(question, lines)
    if match is not None and len(lines) > 1:
        parts.append(
            f"与问题最相关的一行：“{match}”。"
            if chinese
            else f'The line that matches your question: "{match}".'
        )
    if re.search(r"\bdates?\b|\bwhen\b|日期|时间", question, re.IGNORECASE):
        dates = [date.iso() for date, _ in _located(images)]
        if dates:
            joined = ", ".join(dict.fromkeys(dates))
            parts.append(f"图片中的日期：{joined}。" if chinese else f"Dates found: {joined}.")
    parts.append(_listing(images, chinese))
    return "\n\n".join(parts)


def compose_answer(question: str, images: Sequence[ImageText], today: dt.date) -> str:
    """The whole answer for one request (see the module docstring)."""
    chinese = is_chinese(question)
    if not images:
        if chinese:
            return "没有收到图片。ocr-lite 是一个文字识别（OCR）备用模型，只能读取图片中的文字：请附上一张图片。"
        return (
            "No image was given. ocr-lite is an OCR fallback model: it can only read the text "
            "in an image, so please attach one."
        )
    if not any(image.lines for image in images):
        return "图片中没有识别到文字。" if chinese else "No text was found in the image."
    if is_expiry_question(question):
        return _expiry_answer(question, images, today, chinese)
    return _general_answer(question, images, chinese)
