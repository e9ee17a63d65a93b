"""Engine behaviour a client notices: streaming, cancel, errors, fairness, sampling, stops."""

from __future__ import annotations

import time

import pytest
import torch

from inference.engine.detokenizer import REPLACEMENT_CHAR
from inference.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    FinishReason,
    StartEvent,
)
from tests.inference.conftest import (
    chat_request,
    generate_alone,
    image_bytes,
    run_to_completion,
)


def _by_request(events):
    out: dict[str, list] = {}
    for rid, event in events:
        out.setdefault(rid, []).append(event)
    return out


def _text(events):
    return "".join(e.text for e in events if isinstance(e, DeltaEvent))


def _tokens_recorder():
    tokens: dict[str, list[int]] = {}
    return tokens, lambda rid, tok: tokens.setdefault(rid, []).append(tok)


def test_events_stream_incrementally_in_order(make_engine):
    engine = make_engine(max_batch_size=2)
    engine.add_request(chat_request("r1", "What is in the image?", max_tokens=12), {})
    first = engine.step()
    assert [type(e) for _, e in first][:1] == [StartEvent]
    assert any(isinstance(e, DeltaEvent) for _, e in first)  # text before the last token
    assert engine.has_unfinished()
    rest = run_to_completion(engine)
    events = [e for _, e in first + rest]
    assert isinstance(events[0], StartEvent) and isinstance(events[-1], DoneEvent)
    assert all(isinstance(e, DeltaEvent) for e in events[1:-1])
    done = events[-1]
    assert done.usage.completion_tokens == sum(e.tokens for e in events[1:-1]) or (
        done.finish_reason == FinishReason.STOP  # the EOS token is counted, not streamed
    )
    assert _text(events)


def test_chinese_streams_without_broken_characters(make_engine, tiny_runner):
    tokens, observer = _tokens_recorder()
    engine = make_engine(max_batch_size=4, token_observer=observer)
    questions = ["天气怎么样？", "描述这张照片。", "这是哪里？", "图片里有什么？"]
    for i, question in enumerate(questions):
        engine.add_request(chat_request(f"zh{i}", question, max_tokens=40), {})
    streams = _by_request(run_to_completion(engine))
    tokenizer = tiny_runner.tokenizer
    eos = tiny_runner.special.eos_ids
    split_chars = 0
    for rid, events in streams.items():
        deltas = [e.text for e in events if isinstance(e, DeltaEvent)]
        assert all(REPLACEMENT_CHAR not in d for d in deltas), deltas
        ids = [t for t in tokens[rid] if t not in eos]
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
        split_chars += sum(REPLACEMENT_CHAR in tokenizer.decode([t]) for t in ids)
    assert split_chars > 0  # characters really did span several tokens
    assert any(len(deltas) > 3 for deltas in streams.values())


def test_cancel_frees_the_slot_within_one_step(make_engine):
    engine = make_engine(max_batch_size=1)
    engine.add_request(chat_request("a", "Describe the picture.", max_tokens=50), {})
    engine.add_request(chat_request("b", "天气怎么样？", max_tokens=5), {})
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1
    engine.abort("a")
    events = engine.step()
    kinds = [(rid, type(e)) for rid, e in events]
    assert ("a", DoneEvent) in kinds and ("b", StartEvent) in kinds
    done = next(e for rid, e in events if rid == "a")
    assert done.finish_reason == FinishReason.CANCELLED
    assert done.usage.completion_tokens >= 1
    assert not any(rid == "a" for rid, _ in run_to_completion(engine))
    engine.abort("a")  # unknown now: ignored
    assert engine.step() == []


def test_cancel_while_waiting(make_engine):
    engine = make_engine(max_batch_size=1)
    engine.add_request(chat_request("a", "Describe the picture.", max_tokens=5), {})
    engine.add_request(chat_request("b", "Describe the picture.", max_tokens=5), {})
    engine.abort("b")
    streams = _by_request(run_to_completion(engine))
    assert [type(e) for e in streams["b"]] == [DoneEvent]
    assert streams["b"][0].finish_reason == FinishReason.CANCELLED


def test_prompt_plus_max_tokens_must_fit_a_slot(make_engine, tiny_runner):
    hi = chat_request("ok", "Hi", max_tokens=1)
    prompt_len = tiny_runner.prepare(hi.messages, {}, thinking=False).length
    engine = make_engine(max_batch_size=2, max_seq_len=prompt_len + 6)
    engine.add_request(
        chat_request("image", "What is in the image?", images={"x": (56, 56)}),
        {"x": image_bytes(56, 56)},
    )
    engine.add_request(chat_request("greedy", "Hi", max_tokens=7), {})
    engine.add_request(chat_request("ok", "Hi", max_tokens=6), {})
    first = _by_request(engine.step())
    # Rejected at once, before any model work, with what to change in the message.
    for rid in ("image", "greedy"):
        [error] = first[rid]
        assert isinstance(error, ErrorEvent) and error.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
        assert "max_tokens" in error.message and str(prompt_len + 6) in error.message
    assert isinstance(first["ok"][0], StartEvent)
    streams = _by_request(run_to_completion(engine))
    done = streams["ok"][-1]
    assert isinstance(done, DoneEvent)
    assert done.usage.prompt_tokens + done.usage.completion_tokens <= prompt_len + 6


def test_requests_wait_for_a_free_slot_rather_than_fail(make_engine):
    engine = make_engine(max_batch_size=2, num_slots=2)
    for i in range(5):
        engine.add_request(chat_request(f"r{i}", "天气怎么样？", max_tokens=4), {})
    engine.step()
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (2, 3)
    streams = _by_request(run_to_completion(engine))
    assert all(isinstance(events[-1], DoneEvent) for events in streams.values())
    assert len(streams) == 5


def test_bad_or_missing_image_fails_only_that_request(make_engine):
    engine = make_engine(max_batch_size=3)
    engine.add_request(chat_request("bad", "?", images={"x": (28, 28)}), {"x": b"not an image"})
    engine.add_request(chat_request("missing", "?", images={"y": (28, 28)}), {})
    engine.add_request(chat_request("good", "天气怎么样？", max_tokens=4), {})
    streams = _by_request(run_to_completion(engine))
    assert streams["bad"][0].code == ErrorCode.INVALID_REQUEST
    assert streams["missing"][0].code == ErrorCode.IMAGE_UNAVAILABLE
    assert isinstance(streams["good"][-1], DoneEvent)


@pytest.mark.parametrize(
    ("exc", "code", "retryable"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), ErrorCode.OUT_OF_MEMORY, True),
        (RuntimeError("boom"), ErrorCode.INTERNAL_ERROR, False),
    ],
)
def test_prefill_failure_fails_only_that_request(
    make_engine, tiny_runner, monkeypatch, exc, code, retryable
):
    real_prefill = tiny_runner.prefill
    calls = []

    def prefill(cache, chunks):
        calls.append(chunks)
        if len(calls) == 2:
            raise exc
        return real_prefill(cache, chunks)

    monkeypatch.setattr(tiny_runner, "prefill", prefill)
    engine = make_engine(max_batch_size=1)
    for rid in ("first", "victim", "third"):
        engine.add_request(chat_request(rid, "天气怎么样？", max_tokens=3), {})
    streams = _by_request(run_to_completion(engine))
    [error] = streams["victim"]
    assert error.code == code and error.retryable is retryable
    assert isinstance(streams["first"][-1], DoneEvent)
    assert isinstance(streams["third"][-1], DoneEvent)  # its slot was given back


def test_a_prompt_failing_in_a_packed_prefill_fails_alone(
    make_engine, tiny_runner, monkeypatch, caplog
):
    victim = chat_request("victim", "天气怎么样？", max_tokens=4)
    victim_ids = tiny_runner.prepare(victim.messages, {}, thinking=False).input_ids[0].tolist()
    real_prefill = tiny_runner.prefill
    packed = []

    def prefill(cache, chunks):
        packed.append(len(chunks))
        if any(job.token_ids == victim_ids for job, _, _ in chunks):
            raise RuntimeError("boom")
        return real_prefill(cache, chunks)

    monkeypatch.setattr(tiny_runner, "prefill", prefill)
    tokens, observer = _tokens_recorder()
    engine = make_engine(max_batch_size=4, token_observer=observer)
    survivor = chat_request("survivor", "Describe the picture.", max_tokens=4)
    engine.add_request(survivor, {})
    engine.add_request(victim, {})
    streams = _by_request(run_to_completion(engine))
    assert packed[:3] == [2, 1, 1]  # together, then each prompt alone
    [error] = streams["victim"]
    assert error.code == ErrorCode.INTERNAL_ERROR and "boom" not in error.message
    assert "boom" in caplog.text  # the exception is in the log, with its traceback
    assert isinstance(streams["survivor"][-1], DoneEvent)
    assert tokens["survivor"] == generate_alone(tiny_runner, survivor, {}, max_new_tokens=4)


def test_tenants_are_served_fairly(make_engine):
    engine = make_engine(max_batch_size=2)
    for i in range(50):
        engine.add_request(chat_request(f"A{i}", "Hi", tenant_id="A", max_tokens=2), {})
    for i in range(2):
        engine.add_request(chat_request(f"B{i}", "Hi", tenant_id="B", max_tokens=2), {})
    events = run_to_completion(engine)
    assert len([rid for rid, e in events if isinstance(e, DoneEvent)]) == 52
    # Served = started: requests admitted in one step finish in slot order, not queue order.
    started = [rid for rid, e in events if isinstance(e, StartEvent)]
    last_b = max(started.index("B0"), started.index("B1"))
    assert last_b < 6  # first-come-first-served would put them at 50 and 51
    assert started.index("A49") > last_b
    a_order = [rid for rid in started if rid.startswith("A")]
    assert a_order == sorted(a_order, key=lambda r: int(r[1:]))  # FIFO within a tenant


def _sampled_tokens(make_engine, seed, *, neighbours=0):
    tokens, observer = _tokens_recorder()
    engine = make_engine(max_batch_size=4, token_observer=observer)
    for i in range(neighbours):  # other traffic in the batch must not change the draw
        engine.add_request(chat_request(f"n{i}", "这是哪里？", temperature=1.0, max_tokens=30), {})
    request = chat_request(
        "s", "Tell me about cats", temperature=1.5, top_p=0.95, seed=seed, max_tokens=24
    )
    engine.add_request(request, {})
    run_to_completion(engine)
    return tokens["s"]


def test_seeded_sampling_is_reproducible(make_engine):
    first = _sampled_tokens(make_engine, seed=1234)
    assert _sampled_tokens(make_engine, seed=1234, neighbours=2) == first
    others = [_sampled_tokens(make_engine, seed=s) for s in (1, 2, 3)]
    assert any(o != first for o in others)  # the seed matters


def test_stop_string_ends_request_and_is_not_emitted(make_engine):
    engine = make_engine()
    engine.add_request(chat_request("plain", "What is in the image?", max_tokens=30), {})
    plain = _text(_by_request(run_to_completion(engine))["plain"])
    assert "cat" in plain  # the tiny model's answer for this question
    engine.add_request(
        chat_request("stop", "What is in the image?", max_tokens=30, stop=["cat"]), {}
    )
    events = _by_request(run_to_completion(engine))["stop"]
    assert _text(events) == plain[: plain.index("cat")]
    assert events[-1].finish_reason == FinishReason.STOP


def test_max_tokens_gives_length_finish(make_engine):
    engine = make_engine()
    engine.add_request(chat_request("r", "Describe the picture.", max_tokens=3), {})
    done = _by_request(run_to_completion(engine))["r"][-1]
    assert done.finish_reason == FinishReason.LENGTH
    assert done.usage.completion_tokens == 3


def test_thinking_goes_to_reasoning(make_engine, tiny_runner):
    tokens, observer = _tokens_recorder()
    engine = make_engine(token_observer=observer)
    engine.add_request(chat_request("t", "What is in the image?", thinking=True, max_tokens=60), {})
    events = _by_request(run_to_completion(engine))["t"]
    reasoning = "".join(e.reasoning for e in events if isinstance(e, DeltaEvent))
    answer = _text(events)
    special = tiny_runner.special
    assert tokens["t"][0] == special.think_start_id
    assert reasoning and answer and "think>" not in reasoning + answer
    usage = events[-1].usage
    assert 0 < usage.reasoning_tokens < usage.completion_tokens
    plain_ids = [t for t in tokens["t"] if t not in special.eos_ids]
    split = plain_ids.index(special.think_end_id)
    decode = tiny_runner.tokenizer.decode
    assert reasoning == decode(plain_ids[1:split])
    assert answer == decode(plain_ids[split + 1 :])


def test_usage_counts_image_tokens(make_engine):
    engine = make_engine()
    request = chat_request("img", "What is in the image?", images={"x": (56, 84)}, max_tokens=2)
    engine.add_request(request, {"x": image_bytes(56, 84)})
    events = _by_request(run_to_completion(engine))["img"]
    start, done = events[0], events[-1]
    assert start.image_tokens > 0
    assert done.usage.image_tokens == start.image_tokens
    assert done.usage.prompt_tokens == start.prompt_tokens > start.image_tokens


def test_duplicate_request_id_raises(make_engine):
    engine = make_engine()
    engine.add_request(chat_request("dup", "Hi"), {})
    with pytest.raises(ValueError):
        engine.add_request(chat_request("dup", "Hi"), {})


def test_deadline_passed_before_start(make_engine):
    engine = make_engine()
    request = chat_request("late", "Hi")
    engine.add_request(type(request)(**{**_fields(request), "deadline": time.time() - 1}), {})
    [(rid, event)] = engine.step()
    assert rid == "late" and event.code == ErrorCode.TIMEOUT


def _fields(struct):
    return {f: getattr(struct, f) for f in struct.__struct_fields__}


def test_stats_report_batch_and_kv_use(make_engine):
    engine = make_engine(max_batch_size=2, max_seq_len=128)
    for i in range(3):
        engine.add_request(chat_request(f"r{i}", "Describe the picture.", max_tokens=20), {})
    engine.step()
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.max_batch_size) == (2, 1, 2)
    assert stats.kv_capacity_tokens == 2 * 128
    assert 0 < stats.kv_used_tokens <= stats.kv_capacity_tokens
    assert stats.device == "cpu" and stats.memory_bytes > 0
    run_to_completion(engine)
    assert engine.stats().tokens_per_second > 0


# --- decode steps launched ahead of their results ------------------------------------------


def test_requests_ending_while_a_decode_step_is_in_flight_lose_and_leak_no_token(
    make_engine, tiny_runner, monkeypatch
):
    """Each step launches the next decode before it looks at the previous one's tokens, so a
    request that ends on a token (EOS, stop string) or is cancelled still has one decode
    row in flight: that token is dropped, never streamed, and its slot is free at once. A
    request ending by length is not launched past its last token."""
    requests = {
        "eos": chat_request("eos", "How many apples are there?", max_tokens=30),
        "stop": chat_request("stop", "What is in the image?", max_tokens=30, stop=["cat"]),
        "length": chat_request("length", "Describe the picture.", max_tokens=5),
        "cancel": chat_request("cancel", "这是哪里？", max_tokens=30),
        "late": chat_request("late", "天气怎么样？", max_tokens=30),  # arrives mid-decode
    }
    expected = {
        rid: generate_alone(tiny_runner, request, {}, max_new_tokens=30)
        for rid, request in requests.items()
    }
    tokens, observer = _tokens_recorder()
    engine = make_engine(max_batch_size=4, token_observer=observer)
    launched_rows = []
    real_launch = engine.decoder.launch

    def launch(rows):
        launched_rows.append(len(rows.host_ids))
        return real_launch(rows)

    monkeypatch.setattr(engine.decoder, "launch", launch)
    for rid in ("eos", "stop", "length", "cancel"):
        engine.add_request(requests[rid], {})
    ended: dict[str, object] = {}
    for step in range(200):
        if not engine.has_unfinished():
            break
        if step == 3:
            engine.add_request(requests["late"], {})
        if len(tokens.get("cancel", ())) == 4 and "cancel" not in ended:
            engine.abort("cancel")
        before = engine.stats()
        events = engine.step()
        after = engine.stats()
        finished = 0
        for rid, event in events:
            assert rid not in ended, f"{rid}: {event} after its terminal event"
            if isinstance(event, DoneEvent | ErrorEvent):
                ended[rid] = event
                finished += 1
                # Every token sampled for it was counted; none came after.
                assert event.usage.completion_tokens == len(tokens[rid])
        # A request leaves the engine (and its slot) in the step of its terminal event.
        assert after.running + after.waiting == before.running + before.waiting - finished

    eos_ids = tiny_runner.special.eos_ids
    reasons = {rid: event.finish_reason for rid, event in ended.items()}
    assert reasons == {
        "eos": FinishReason.STOP,
        "stop": FinishReason.STOP,
        "length": FinishReason.LENGTH,
        "cancel": FinishReason.CANCELLED,
        "late": FinishReason.STOP,
    }
    for rid in ("eos", "late"):
        assert tokens[rid] == expected[rid] and tokens[rid][-1] in eos_ids
    assert tokens["length"] == expected["length"][:5]
    assert tokens["cancel"] == expected["cancel"][:4]
    stop = tokens["stop"]
    assert stop == expected["stop"][: len(stop)]
    decode = tiny_runner.tokenizer.decode
    assert "cat" in decode(stop) and "cat" not in decode(stop[:-1])
    # Every launched row is a delivered token or the one token in flight of each request
    # that ended on a token or was cancelled (the first token comes from the prefill).
    delivered = sum(len(ids) - 1 for ids in tokens.values())
    assert sum(launched_rows) == delivered + 4
    stats = engine.stats()
    assert engine.slots.free == engine.slots.num_slots
    assert (stats.running, stats.waiting, stats.kv_used_tokens) == (0, 0, 0)


def test_the_first_token_streams_in_the_step_that_completes_the_prefill(make_engine):
    steps: dict[str, list[int]] = {}
    step = 0
    engine = make_engine(
        prefill_budget_tokens=4,
        idle_prefill_budget_tokens=4,
        token_observer=lambda rid, tok: steps.setdefault(rid, []).append(step),
    )
    engine.add_request(chat_request("first", "What is in the image?", max_tokens=20), {})
    started: dict[str, int] = {}
    streamed: dict[str, int] = {}
    while engine.has_unfinished():
        step += 1
        if step == 6:  # joins while "first" decodes: prefilled under the busy budget
            engine.add_request(chat_request("second", "Describe the picture.", max_tokens=4), {})
        for rid, event in engine.step():
            if isinstance(event, StartEvent):
                started[rid] = step
            if isinstance(event, DeltaEvent):
                streamed.setdefault(rid, step)
    assert started["first"] >= 4  # a 16-token prompt at 4 tokens a step
    assert started["second"] >= 6 + 3
    for rid in ("first", "second"):
        first, second, *rest = steps[rid]
        assert first == started[rid] == streamed[rid]
        # The next decode is launched a step later and collected one after (launch-ahead);
        # from then on a token every step.
        assert second <= first + 2
        assert [second, *rest] == list(range(second, second + 1 + len(rest)))


def test_stats_report_the_decode_batch_and_recent_step_times(make_engine, monkeypatch):
    engine = make_engine(max_batch_size=4, step_window=3)
    stats = engine.stats()
    assert (stats.decoding, stats.batch_bucket, stats.occupancy) == (0, 0, 1.0)
    assert stats.step_ms_p50 is None and stats.step_ms_p99 is None
    assert stats.compiled_batch_sizes == () and stats.compile_error is None  # CPU default
    for i in range(3):
        engine.add_request(chat_request(f"r{i}", "Describe the picture.", max_tokens=12), {})
    engine.step()
    assert engine.stats().step_ms_p50 is None  # prefill only, nothing decoded: no step time
    while engine.stats().prefilling or engine.stats().waiting:
        engine.step()

    real_launch = engine.decoder.launch

    def slow_launch(rows):
        time.sleep(0.5)
        return real_launch(rows)

    with monkeypatch.context() as patch:
        patch.setattr(engine.decoder, "launch", slow_launch)
        engine.step()
    stats = engine.stats()
    assert (stats.decoding, stats.batch_bucket) == (3, 4)
    assert stats.occupancy == 0.75
    assert stats.step_ms_p99 >= 500 and stats.step_ms_p50 <= stats.step_ms_p99
    for _ in range(3):
        engine.step()
    stats = engine.stats()
    assert stats.step_ms_p99 < 500  # the slow step left the window of three
    assert 0 < stats.step_ms_p50 <= stats.step_ms_p99


def test_greedy_and_seeded_requests_share_a_batch_without_changing_each_other(make_engine):
    seeded = _sampled_tokens(make_engine, seed=77)
    greedy = chat_request("g", "Describe the picture.", max_tokens=24)
    tokens, observer = _tokens_recorder()
    engine = make_engine(max_batch_size=4, token_observer=observer)
    batches = []
    real_launch = engine.decoder.launch

    def launch(rows):
        batches.append((len(rows.host_ids), rows.sampling is not None))
        return real_launch(rows)

    engine.decoder.launch = launch
    engine.add_request(greedy, {})
    engine.add_request(chat_request("n", "这是哪里？", temperature=1.0, max_tokens=30), {})
    engine.add_request(
        chat_request(
            "s", "Tell me about cats", temperature=1.5, top_p=0.95, seed=77, max_tokens=24
        ),
        {},
    )
    run_to_completion(engine)
    assert tokens["s"] == seeded
    assert tokens["g"] == generate_alone(engine.runner, greedy, {}, max_new_tokens=24)
    assert (3, True) in batches  # sampling steps with a padded row (bucket of four)


def test_a_failed_decode_launch_leaves_the_requests_outside_it_intact(
    tiny_random_runner, monkeypatch
):
    from inference.engine import Engine, EngineConfig

    short = chat_request("short", "Describe the picture.", max_tokens=3)
    tokens, observer = _tokens_recorder()
    engine = Engine(
        tiny_random_runner, EngineConfig(max_batch_size=2, max_seq_len=128, token_observer=observer)
    )
    real_launch = engine.decoder.launch
    launches = []

    def launch(rows):
        launches.append(len(rows.host_ids))
        if len(launches) == 3:  # "short" has its last token in flight and is not in this one
            raise RuntimeError("decode kernel failed")
        return real_launch(rows)

    monkeypatch.setattr(engine.decoder, "launch", launch)
    engine.add_request(short, {})
    engine.add_request(chat_request("long", "这是哪里？", max_tokens=20), {})
    last = {rid: event for rid, event in run_to_completion(engine)}
    assert launches[2] == 1 and last["long"].code == ErrorCode.INTERNAL_ERROR
    assert last["short"].finish_reason == FinishReason.LENGTH
    assert tokens["short"] == generate_alone(tiny_random_runner, short, {}, max_new_tokens=3)


def test_an_idle_engine_admits_a_request_for_every_free_slot_in_one_step(make_engine):
    engine = make_engine(max_batch_size=4)
    for i in range(4):
        engine.add_request(chat_request(f"r{i}", "Hi", max_tokens=5), {})
    started = [rid for rid, e in engine.step() if isinstance(e, StartEvent)]
    assert started == ["r0", "r1", "r2", "r3"]
