"""What fast/slow routing adds to a request's latency, against naming the model directly.

One process, interleaved (drift hits both alike), two measurements:

1. ``decision``: ``model_choose`` alone (webplatform/completions/model_choice.py) for the
   same validated input, once naming the model and once as ``auto`` (every rule evaluated:
   plan, quality, images, prompt length, the English and Chinese intent keywords and
   regexes, none matching), in microseconds;
2. ``request``: whole ``POST /v1/chat/completions`` requests through the platform's ASGI
   application (httpx's ASGI transport: no sockets; middleware, authentication, quota,
   the pipeline, settlement and the usage record in the database all run), answered by the
   tiny GLM-4.6V model in-process on the CPU (4 tokens, greedy, answer cache off), once with
   ``model: "glm-4.6v-flash"`` and once with ``model: "auto"`` routed to that same model with
   escalation on (its check of the answer runs; an escalation, if any, is counted).

It creates its own database the way the test runner does (``TEST_DATABASE_NAME``), and a
throwaway tenant and key. Run it as::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/14 \\
    PLATFORM_TESTING=1 TEST_DATABASE_NAME=bench_routing \\
    .venv/bin/python benchmarks/routing.py --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webplatform.settings")

import django

django.setup()

import httpx  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from inference.client import reset_inference_client  # noqa: E402
from tenants.models import Plan, UsageRecord  # noqa: E402
from tenants.principals import ApiPrincipal  # noqa: E402
from tenants.selectors.tenants import tenant_limits_get  # noqa: E402
from tenants.services.api_keys import api_key_create  # noqa: E402
from tenants.services.tenants import tenant_create  # noqa: E402
from webplatform.completions.model_choice import model_choose  # noqa: E402
from webplatform.completions.request import ChatCompletionInput, ChatTurn  # noqa: E402

FAST, SLOW = "glm-4.6v-flash", "glm-4.6v-large"
QUESTION = (
    "Here is the label of the parcel we received this morning; the sender wrote the "
    "reference by hand. Which warehouse should it go to, and is the weight printed on it "
    "within what our courier accepts for the standard tariff? Answer briefly. "
) * 3


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def _summary(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return statistics.median(values), _percentile(values, 0.99)


def _model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    import torch

    from inference.tiny_model import build_tiny_model

    target = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    torch.manual_seed(0)
    build_tiny_model(target, seed=0)
    return target


def _decision(principal: ApiPrincipal, rounds: int, per_round: int) -> dict[str, list[float]]:
    turns = (ChatTurn(role="user", parts=(QUESTION,)),)
    inputs = {
        "direct": ChatCompletionInput(model=FAST, turns=turns),
        "auto": ChatCompletionInput(model="auto", turns=turns),
    }
    assert model_choose(principal=principal, inp=inputs["auto"], images={}).model == FAST
    timings: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(rounds):
        for name, inp in inputs.items():
            for _ in range(per_round):
                start = time.perf_counter_ns()
                model_choose(principal=principal, inp=inp, images={})
                timings[name].append((time.perf_counter_ns() - start) / 1000)
    return timings


async def _requests(
    raw_key: str, rounds: int, per_round: int, warmup: int
) -> dict[str, list[float]]:
    from webplatform.asgi import application

    transport = httpx.ASGITransport(app=application)
    headers = {"Authorization": f"Bearer {raw_key}"}
    bodies = {
        name: {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 4,
            "temperature": 0,
            "cache": False,
        }
        for name, model in (("direct", FAST), ("auto", "auto"))
    }
    timings: dict[str, list[float]] = {name: [] for name in bodies}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=headers, timeout=120
    ) as http:
        for name, body in bodies.items():
            for _ in range(warmup):
                response = await http.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, (name, response.text)
        # Strictly alternating (the order flipped every pair): the shared machine's load
        # changes by the second, and both kinds see the same.
        order = list(bodies.items())
        for i in range(rounds * per_round):
            for name, body in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter_ns()
                response = await http.post("/v1/chat/completions", json=body)
                timings[name].append((time.perf_counter_ns() - start) / 1e6)
                assert response.status_code == 200, (name, response.text)
                assert response.json()["model"] == FAST
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="whole requests per kind")
    parser.add_argument("--decisions", type=int, default=20_000, help="model_choose per kind")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model-dir", help="the tiny checkpoint (built in a temp dir if absent)")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    model_dir = _model_dir(args.model_dir)
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["testserver"]
    settings.INFERENCE_TRANSPORT = "inprocess"
    settings.INFERENCE_MODELS = {
        FAST: {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        # Never asked here (no rule matches, escalation finds nothing): a closed port.
        SLOW: {"kind": "openai-upstream", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0},
    }
    settings.ROUTING = {"fast_model": FAST, "slow_model": SLOW}
    settings.QUOTA_KEY_PREFIX = f"bench-quota-{uuid.uuid4().hex[:12]}"
    reset_inference_client()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        plan = Plan.objects.create(
            name=f"bench-{uuid.uuid4().hex[:8]}",
            requests_per_minute=10**9,
            tokens_per_day=10**15,
            concurrent_requests=10**6,
            max_output_tokens=4096,
        )
        tenant = tenant_create(name="Benchmark", plan=plan)
        raw_key = api_key_create(tenant=tenant, name="bench").raw_key
        principal = ApiPrincipal(tenant=tenant, limits=tenant_limits_get(tenant=tenant))

        per_decision = max(1, args.decisions // args.rounds)
        decisions = _decision(principal, args.rounds, per_decision)
        per_request = max(1, args.requests // args.rounds)
        requests = asyncio.run(_requests(raw_key, args.rounds, per_request, args.warmup))
        escalated = UsageRecord.objects.exclude(escalated_from="").count()
        rules = sorted(set(UsageRecord.objects.values_list("route_rule", flat=True)))

        print(
            f"cpu_count={os.cpu_count()} python={sys.version.split()[0]} "
            f"prompt_chars={len(QUESTION)} decisions/kind={per_decision * args.rounds} "
            f"requests/kind={per_request * args.rounds} escalated={escalated} rules={rules}"
        )
        d_direct, d_auto = _summary(decisions["direct"]), _summary(decisions["auto"])
        r_direct, r_auto = _summary(requests["direct"]), _summary(requests["auto"])
        print(f"{'':<22}{'median':>10}{'p99':>10}")
        print(f"{'decision direct (us)':<22}{d_direct[0]:>10.2f}{d_direct[1]:>10.2f}")
        print(f"{'decision auto (us)':<22}{d_auto[0]:>10.2f}{d_auto[1]:>10.2f}")
        print(f"{'request direct (ms)':<22}{r_direct[0]:>10.2f}{r_direct[1]:>10.2f}")
        print(f"{'request auto (ms)':<22}{r_auto[0]:>10.2f}{r_auto[1]:>10.2f}")
        print(
            f"routing adds: decision {d_auto[0] - d_direct[0]:.1f} us median, "
            f"{d_auto[1] - d_direct[1]:.1f} us p99; whole request auto/direct "
            f"median {r_auto[0] / r_direct[0]:.3f}x ({r_auto[0] - r_direct[0]:+.2f} ms), "
            f"p99 {r_auto[1] / r_direct[1]:.3f}x ({r_auto[1] - r_direct[1]:+.2f} ms)"
        )
    finally:
        reset_inference_client()
        # The ASGI app's worker threads keep their own sessions on the database: end them.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
