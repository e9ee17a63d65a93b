"""Detokenizing: ``OutputStream.push`` per token, window decode against Rust ``DecodeStream``.

``OutputStream.push`` runs on the engine thread for every running request at every decode
step, so its cost per token bounds the batch the host can keep up with. Two paths over the
same token ids, in one process, in interleaved rounds (the order alternates every round):

- ``old``: the window decode (two ``tokenizer.decode`` calls per token), what every tokenizer
  took before and what a tokenizer without a Rust backend still takes; forced here by handing
  ``OutputStream`` a decode-only view of the tokenizer (one extra Python call per decode);
- ``new``: the same fast tokenizer handed over as it is: ``tokenizers.decoders.DecodeStream``.

The ids: a reasoning part and an answer part of mixed English and Chinese text (so many
characters span several tokens) between the checkpoint's ``<think>``/``</think>`` ids, the
order the model emits them; cut to ``--tokens``. ``OutputStream.push`` runs without stop
strings and with two that never match (every token then passes the stop filter);
``IncrementalDetokenizer.push`` alone (the think ids left out) shows what the two paths
themselves cost. Each round pushes all the ids through a fresh stream and checks that both
paths stream the same text, which must equal ``tokenizer.decode``; ``finish()``/``flush()``
(once per stream) are left out of the time. Reported: the median over rounds of
microseconds per token, and new/old.

    .venv/bin/python benchmarks/detokenize.py              # tiny checkpoint, built in a temp dir
    .venv/bin/python benchmarks/detokenize.py --model DIR  # a checkpoint's own tokenizer
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.engine.detokenizer import IncrementalDetokenizer, OutputStream

REASONING = [
    "The user asks what is in the picture, so I look at it carefully.",
    "图片的左边有一张木头桌子，桌子上坐着一只红色的猫。",
    "The cat looks at the window; 窗外是晴朗的白天，天空很明亮。",
    "I count the apples: one, two, three. 一共有三个苹果。",
]
ANSWER = [
    "图片里有一只红色的猫坐在桌子上，旁边放着三个苹果。",
    "A red cat sits on a wooden table next to three apples, 风景如画。",
    "窗外的天气很好，我们可以去公园散步。 The sky is bright and blue.",
    "两只小狗在绿色的公园里奔跑, and a man is reading a book under a tree.",
]
STOPS = ["</answer>", "Observation:"]


class DecodeOnly:
    """The tokenizer seen through ``decode`` alone: ``OutputStream`` takes the window decode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self._tokenizer.decode(ids, **kwargs)


def token_ids(tokenizer: Any, count: int) -> tuple[list[int], int, int]:
    """``<think>`` reasoning ``</think>`` answer, repeated to ``count`` ids."""
    think_start = tokenizer.convert_tokens_to_ids("<think>")
    think_end = tokenizer.convert_tokens_to_ids("</think>")

    def encode(lines: list[str]) -> list[int]:
        return tokenizer(" ".join(lines) + "\n", add_special_tokens=False)["input_ids"]

    turn = [think_start, *encode(REASONING), think_end, *encode(ANSWER)]
    return (turn * (count // len(turn) + 1))[:count], think_start, think_end


def stream_once(tokenizer: Any, ids: list[int], stops: list[str] | None, think: tuple[int, int]):
    """Per-token µs and the streamed text; ``stops=None``: ``IncrementalDetokenizer`` alone."""
    if stops is None:
        detok = IncrementalDetokenizer(tokenizer)
        body = [t for t in ids if t not in think]
        start = time.perf_counter()
        pieces = [detok.push(token) for token in body]
        elapsed = time.perf_counter() - start
        return elapsed * 1e6 / len(body), "".join(pieces) + detok.flush()
    stream = OutputStream(tokenizer, stop=stops, think_start_id=think[0], think_end_id=think[1])
    start = time.perf_counter()
    deltas = [stream.push(token) for token in ids]
    elapsed = time.perf_counter() - start
    deltas.append(stream.finish())
    return elapsed * 1e6 / len(ids), "".join(d.reasoning + d.text for d in deltas)


def measure(
    tokenizer: Any, ids: list[int], think: tuple[int, int], stops: list[str] | None, rounds: int
) -> dict[str, float]:
    paths = {"old": DecodeOnly(tokenizer), "new": tokenizer}
    expected = tokenizer.decode(
        [t for t in ids if t not in think],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    times: dict[str, list[float]] = {"old": [], "new": []}
    for round_ in range(rounds + 1):  # round 0 warms up and is dropped
        for name in ("old", "new") if round_ % 2 else ("new", "old"):
            per_token, text = stream_once(paths[name], ids, stops, think)
            if text != expected:
                raise AssertionError(f"{name} streamed other text than tokenizer.decode")
            if round_:
                times[name].append(per_token)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            path = args.model
        else:
            from inference.tiny_model import build_tiny_model

            # Only its tokenizer is used: an untrained model is enough.
            path = str(build_tiny_model(Path(tmp) / "tiny", train_steps=0))
        tokenizer = AutoTokenizer.from_pretrained(path)

    import tokenizers
    import transformers

    ids, think_start, think_end = token_ids(tokenizer, args.tokens)
    print(
        f"tokenizer={type(tokenizer).__name__} vocab={len(tokenizer)} tokens={len(ids)} "
        f"rounds={args.rounds} python={platform.python_version()} "
        f"tokenizers={tokenizers.__version__} transformers={transformers.__version__}"
    )
    print(f"{'what':<28} {'old µs':>8} {'new µs':>8} {'new/old':>8}   (median per token)")
    configurations = {
        "OutputStream.push": [],
        "OutputStream.push, 2 stops": STOPS,
        "IncrementalDetokenizer.push": None,
    }
    for label, stops in configurations.items():
        med = measure(tokenizer, ids, (think_start, think_end), stops, args.rounds)
        print(f"{label:<28} {med['old']:8.2f} {med['new']:8.2f} {med['new'] / med['old']:8.3f}")


if __name__ == "__main__":
    main()
