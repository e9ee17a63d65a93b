"""Scale-out of the inference workers: requests/s against worker processes, and workers
added and removed under load without losing a request.

    .venv/bin/python scripts/scaleout_bench.py                       # 1, 2, 4 workers
    .venv/bin/python scripts/scaleout_bench.py --workers 1 2 --requests 16 --json out.json

Each run starts N real worker processes (``python -m inference.worker``, the tiny GLM-4.6V
model on the CPU) on a fresh key prefix of one Redis (``REDIS_URL``), sends ``--requests``
requests through the web side's Redis client with ``--concurrency`` in flight (a closed
loop: text-only, greedy, ``--max-tokens``), and reports requests/s over the wall time of the
loop. Then the elastic run: one worker under the same load, a second one started while
requests are in flight, the first stopped with SIGTERM mid-load; every request must end
with a ``DoneEvent`` carrying its whole answer (nothing lost, nothing failed).

Where the workers run (``--network``): ``netns`` puts each worker in its own network
namespace, joined to the host by a veth pair with /30 addresses (10.213.<c>.<4i+1> on the
host, .<4i+2> in the namespace; <c> a /24 no other run uses), and starts a private
``redis-server`` for the run bound to 127.0.0.1 and the host ends: each worker reaches Redis
over a real network interface, as a separate host would. ``loopback`` runs the workers as
plain children on the host against ``--redis-url``. ``auto`` (the default) takes netns when
``ip netns add`` works (root, or CAP_NET_ADMIN) and ``redis-server`` is installed, loopback
otherwise; the report says which ran and why. ``both`` runs the fixed runs on loopback and
on netns against the same private Redis (the elastic run on netns), to compare the two.
Namespaces, veths and the private Redis carry the run's pid in their names and are removed
in a ``finally`` even when the run fails or is interrupted (Ctrl-C, SIGTERM).
``--link-delay-ms`` adds that one-way delay on each veth end with ``tc ... netem`` (needs the
kernel's sch_netem).

On a machine with few cores the workers share them, so requests/s stops growing once the
cores are busy: the figure then measures the machine, not the queue. The worker processes'
CPU is reported beside it for that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from inference.client.redis_streams import RedisStreamsClient  # noqa: E402
from inference.protocol import (  # noqa: E402
    DeltaEvent,
    DoneEvent,
    InferenceRequest,
    KeySpace,
    Message,
    SamplingParams,
    TextPart,
    new_request_id,
)
from inference.settings import InferenceSettings  # noqa: E402
from scripts.scaleout_net import Loopback, Netns, Placement, netns_unavailable  # noqa: E402

MODEL = "tiny"


class Workers:
    """Worker processes of one key prefix."""

    def __init__(self, *, net: Placement, prefix: str, model_dir: Path, log_dir: Path) -> None:
        self.net, self.prefix, self.model_dir, self.log_dir = net, prefix, model_dir, log_dir
        self.url = net.client_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.keys = KeySpace(prefix)
        self.namespaces: dict[str, str] = {}  # worker id -> the namespace it ran in

    def start(self, worker_id: str, *, batch: int, slot: int) -> None:
        env = {
            **os.environ,
            "INFERENCE_REDIS_URL": self.net.worker_url(slot),
            "INFERENCE_MODELS": json.dumps(
                {MODEL: {"path": str(self.model_dir), "dtype": "float32", "device": "cpu"}}
            ),
            "INFERENCE_HEARTBEAT_SECONDS": "0.5",
            "INFERENCE_CLAIM_IDLE_MS": "3000",
            # One compute thread per worker: N workers on N cores, not N x cores threads.
            "OMP_NUM_THREADS": "1",
        }
        argv = [*self.net.wrap(slot), sys.executable, "-m", "inference.worker", "--model", MODEL]
        argv += ["--worker-id", worker_id, "--key-prefix", self.prefix]
        argv += ["--max-batch-size", str(batch), "--drain-seconds", "60"]
        log = open(self.log_dir / f"{worker_id}.log", "wb")
        self.procs[worker_id] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log)

    def wait_ready(self, worker_ids: list[str], timeout: float = 180) -> None:
        r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        try:
            for worker_id in worker_ids:
                while not r.exists(self.keys.heartbeat(MODEL, worker_id)):
                    proc = self.procs[worker_id]
                    if proc.poll() is not None:
                        raise RuntimeError(f"{worker_id} exited: {self.log(worker_id)}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{worker_id} not ready: {self.log(worker_id)}")
                    time.sleep(0.1)
                # Where it really runs: the network namespace of its process.
                self.namespaces[worker_id] = self.net.namespace_of(self.procs[worker_id].pid)
        finally:
            r.close()

    def redis_peers(self) -> list[str]:
        """The source addresses of the connections Redis holds now (the workers' among them)."""
        r = redis.Redis.from_url(self.url)
        try:
            clients = r.client_list()
        finally:
            r.close()
        return sorted({c["addr"].rsplit(":", 1)[0] for c in clients})

    def log(self, worker_id: str) -> str:
        return (self.log_dir / f"{worker_id}.log").read_text(errors="replace")[-2000:]

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.procs.values():
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def sigterm(self, worker_id: str) -> subprocess.Popen[bytes]:
        proc = self.procs[worker_id]
        proc.send_signal(signal.SIGTERM)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


PING_RTT = """
import statistics, sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
r.ping()
rtts = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter_ns()
    r.ping()
    rtts.append((time.perf_counter_ns() - t) / 1000)
rtts.sort()
print(round(statistics.median(rtts), 1), round(rtts[int(len(rtts) * 0.99)], 1))
"""


def ping_rtt_us(net: Placement, slot: int, count: int = 2000) -> tuple[float, float]:
    """Median and p99 round trip (us) of a Redis PING from where worker ``slot`` runs: the
    network's own cost per round trip, without the model."""
    argv = [*net.wrap(slot), sys.executable, "-c", PING_RTT, net.worker_url(slot), str(count)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
    median, p99 = done.stdout.split()
    return float(median), float(p99)


def make_request(i: int, max_tokens: int) -> InferenceRequest:
    text = f"describe item {i} in a few words"
    return InferenceRequest(
        request_id=new_request_id(),
        tenant_id="bench",
        model=MODEL,
        messages=[Message(role="user", content=[TextPart(text=text)])],
        # Sampled, not greedy: the tiny model ends greedy answers early (EOS), and the
        # benchmark wants whole answers of max_tokens.
        sampling=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i),
        stream=True,
    )


@dataclass
class Outcome:
    request_id: str
    done: bool
    tokens: int
    finish: str


async def closed_loop(
    client: RedisStreamsClient,
    *,
    requests: int,
    concurrency: int,
    max_tokens: int,
    on_progress: Callable[[int], Awaitable[None]] | None = None,
    more: Callable[[], bool] = lambda: False,
    limit: int = 100_000,
) -> tuple[list[Outcome], float]:
    """``requests`` requests with ``concurrency`` in flight, then more while ``more()`` (at
    most ``limit`` in all)."""
    issued = 0
    outcomes: list[Outcome] = []

    async def one(i: int) -> None:
        request = make_request(i, max_tokens)
        tokens, last = 0, None
        async for event in client.submit(request, time_limit_s=300):
            if isinstance(event, DeltaEvent):
                tokens += event.tokens
            last = event
        done = isinstance(last, DoneEvent)
        finish = last.finish_reason.value if isinstance(last, DoneEvent) else repr(last)
        outcomes.append(Outcome(request.request_id, done, tokens, finish))
        if on_progress is not None:
            await on_progress(len(outcomes))

    async def lane() -> None:
        nonlocal issued
        while issued < limit and (issued < requests or more()):
            issued += 1
            await one(issued)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


@dataclass
class RunResult:
    network: str
    workers: int
    requests: int
    concurrency: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    worker_cpu_s: float
    all_done: bool
    namespaces: dict[str, str] = field(default_factory=dict)  # worker id -> its netns
    redis_peers: list[str] = field(default_factory=list)  # source addresses Redis saw


def bench_client(url: str, prefix: str) -> RedisStreamsClient:
    return RedisStreamsClient(
        settings=InferenceSettings(
            transport="redis", redis_url=url, key_prefix=prefix, models={MODEL: {}}
        )
    )


async def run_fixed(
    args: argparse.Namespace, net: Placement, n: int, model_dir: Path, log_dir: Path
) -> RunResult:
    prefix = f"bench-scaleout-{uuid.uuid4().hex[:8]}"
    workers = Workers(net=net, prefix=prefix, model_dir=model_dir, log_dir=log_dir)
    client = bench_client(net.client_url, prefix)
    try:
        ids = [f"{net.name}-w{n}-{i}" for i in range(n)]
        for slot, worker_id in enumerate(ids):
            workers.start(worker_id, batch=args.batch, slot=slot)
        workers.wait_ready(ids)
        await closed_loop(client, requests=n, concurrency=n, max_tokens=4)  # warm each
        cpu_before = workers.cpu_seconds()
        outcomes, seconds = await closed_loop(
            client, requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens
        )
        cpu = workers.cpu_seconds() - cpu_before
        peers = workers.redis_peers()
    finally:
        await client.aclose()
        workers.stop_all()
        _delete_prefix(net.client_url, prefix)
    tokens = sum(o.tokens for o in outcomes)
    return RunResult(
        network=net.name,
        workers=n,
        requests=len(outcomes),
        concurrency=args.concurrency,
        seconds=round(seconds, 2),
        requests_per_s=round(len(outcomes) / seconds, 2),
        tokens_per_s=round(tokens / seconds, 1),
        worker_cpu_s=round(cpu, 1),
        all_done=all(o.done for o in outcomes),
        namespaces=workers.namespaces,
        redis_peers=peers,
    )


@dataclass
class ElasticResult:
    network: str
    requests: int
    seconds: float
    done: int
    failed: list[str]
    added_after: int  # requests finished when the second worker was started
    removed_after: int  # ... when the first one got SIGTERM
    exited_after: int  # ... when it had drained and exited
    first_exit_code: int | None
    namespaces: dict[str, str] = field(default_factory=dict)


async def run_elastic(
    args: argparse.Namespace, net: Placement, model_dir: Path, log_dir: Path
) -> ElasticResult:
    prefix = f"bench-elastic-{uuid.uuid4().hex[:8]}"
    workers = Workers(net=net, prefix=prefix, model_dir=model_dir, log_dir=log_dir)
    client = bench_client(net.client_url, prefix)
    total = args.elastic_requests
    marks: dict[str, int] = {}
    first: subprocess.Popen[bytes] | None = None

    async def on_progress(finished: int) -> None:
        nonlocal first
        if "added" not in marks:  # at the first answer: the second one loads under load
            marks["added"] = finished
            workers.start("e-second", batch=args.batch, slot=1)
            await asyncio.to_thread(workers.wait_ready, ["e-second"])
            # As soon as the second one serves, the first is told to stop, mid-load.
            marks["removed"] = finished_count()
            first = workers.sigterm("e-first")
        if first is not None and first.poll() is not None and "exited" not in marks:
            marks["exited"] = finished_count()

    def more() -> bool:
        # Keep the load on until the first worker has drained and exited and the second
        # alone has answered a few rounds more (at most 3 minutes: the run stays bounded).
        if time.monotonic() > give_up_at:
            return False
        return "exited" not in marks or finished_count() < marks["exited"] + 2 * args.concurrency

    def finished_count() -> int:
        return progress[-1] if progress else 0

    progress: list[int] = []
    inner = on_progress

    async def on_progress_counted(finished: int) -> None:
        progress.append(finished)
        await inner(finished)

    give_up_at = time.monotonic() + 180
    try:
        workers.start("e-first", batch=args.batch, slot=0)
        workers.wait_ready(["e-first"])
        give_up_at = time.monotonic() + 180
        outcomes, seconds = await closed_loop(
            client,
            requests=total,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            on_progress=on_progress_counted,
            more=more,
        )
        exit_code = first.wait(60) if first is not None else None
    finally:
        await client.aclose()
        workers.stop_all()
        _delete_prefix(net.client_url, prefix)
    return ElasticResult(
        network=net.name,
        requests=len(outcomes),
        seconds=round(seconds, 2),
        done=sum(o.done for o in outcomes),
        failed=[o.finish for o in outcomes if not o.done],
        added_after=marks.get("added", -1),
        removed_after=marks.get("removed", -1),
        exited_after=marks.get("exited", -1),
        first_exit_code=exit_code,
        namespaces=workers.namespaces,
    )


def _delete_prefix(url: str, prefix: str) -> None:
    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])
    finally:
        r.close()


def tiny_model(path: Path | None) -> Path:
    if path is not None:
        return path
    default = ROOT / "var" / "tiny-glm4v"
    if (default / "config.json").exists():
        return default
    from inference.tiny_model import build_tiny_model

    return Path(build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-glm4v-")), seed=0))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="--max-batch-size of each worker")
    p.add_argument(
        "--elastic-requests",
        type=int,
        default=48,
        help="at least this many; the load goes on until a worker was added and the first "
        "one removed (0: skip the elastic run)",
    )
    p.add_argument(
        "--network",
        choices=["auto", "netns", "loopback", "both"],
        default="auto",
        help="netns: each worker in its own network namespace (veth pair, private Redis); "
        "loopback: plain children against --redis-url; auto: netns when `ip netns add` works; "
        "both: the fixed runs on loopback and on netns, same private Redis",
    )
    p.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        help="netns only: one-way delay added on each veth end (tc netem)",
    )
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="loopback only (netns and both start a private redis-server)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    network, why = args.network, ""
    if network in ("auto", "netns", "both"):
        reason = netns_unavailable()
        if reason is None:
            network = "netns" if network == "auto" else network
            why = "ip netns add works"
        elif network == "auto":
            network, why = "loopback", f"netns unavailable: {reason}"
        else:
            p.error(f"--network {network}: {reason}")
    else:
        why = "asked for"
    if args.link_delay_ms and network == "loopback":
        p.error("--link-delay-ms needs the netns network")
    # Ctrl-C and SIGTERM raise at once, wherever the run is (asyncio.run would only cancel
    # its task, which waits out a blocking wait for a loading worker), and go through the
    # finally below: the namespaces, veths and private Redis go with the run.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    model_dir = tiny_model(args.model_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="scaleout-logs-"))
    slots = max([*args.workers, 2 if args.elastic_requests else 1])
    netns = Netns(slots, link_delay_ms=args.link_delay_ms) if network != "loopback" else None
    results: dict[str, object] = {
        "cores": os.cpu_count(),
        "network": network,
        "network_reason": why,
        "link_delay_ms": args.link_delay_ms,
        "fixed": [],
        "elastic": None,
    }
    ok = True
    try:
        if netns is not None:
            netns.setup()
            results["netns"] = {
                "namespaces": netns.namespaces,
                "veths": netns.veths,
                "worker_addrs": netns.worker_addrs,
                "redis": netns.client_url,
            }
        placements: list[Placement] = []
        if network in ("loopback", "both"):
            placements.append(Loopback(netns.client_url if netns else args.redis_url))
        if netns is not None:
            placements.append(netns)
        print(
            f"cores: {os.cpu_count()}; network: {network} ({why}); worker logs: {log_dir}",
            flush=True,
        )
        pings: dict[str, dict[str, float]] = {}
        for net in placements:
            median, p99 = ping_rtt_us(net, 0)
            pings[net.name] = {"median_us": median, "p99_us": p99}
            print(f"{net.name}: Redis PING round trip {median} us median, {p99} us p99")
        results["redis_ping"] = pings
        fixed: list[RunResult] = []
        print("network   workers  requests/s  tokens/s  worker CPU s  all done", flush=True)
        for net in placements:
            for n in args.workers:
                result = asyncio.run(run_fixed(args, net, n, model_dir, log_dir))
                fixed.append(result)
                print(
                    f"{net.name:<8}  {n:>7}  {result.requests_per_s:>10}  "
                    f"{result.tokens_per_s:>8}  {result.worker_cpu_s:>12}  {result.all_done}",
                    flush=True,
                )
        results["fixed"] = [asdict(r) for r in fixed]
        ok = all(r.all_done for r in fixed)
        if args.elastic_requests:
            elastic = asyncio.run(run_elastic(args, placements[-1], model_dir, log_dir))
            results["elastic"] = asdict(elastic)
            print(
                f"elastic ({elastic.network}): {elastic.done}/{elastic.requests} done in "
                f"{elastic.seconds}s; second worker added after {elastic.added_after}, first "
                f"SIGTERMed after {elastic.removed_after}, exited after {elastic.exited_after} "
                f"(exit code {elastic.first_exit_code}); failed: {elastic.failed or 'none'}",
                flush=True,
            )
            ok = ok and elastic.done == elastic.requests and elastic.first_exit_code == 0
            ok = ok and 0 < elastic.removed_after <= elastic.exited_after < elastic.requests
    finally:
        if netns is not None:
            errors = netns.teardown()
            results["teardown_errors"] = errors
            for error in errors:
                print(f"teardown: {error}", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
