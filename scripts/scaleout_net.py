"""Where ``scaleout_bench.py`` runs its workers: plain children on the host (``Loopback``),
or one network namespace each (``Netns``), joined to the host by a veth pair with /30
addresses (10.213.<c>.<4i+1> on the host, .<4i+2> in the namespace; <c> a /24 no other
run uses), with a private ``redis-server`` bound to 127.0.0.1 and the host ends, and
``tc ... netem`` delay on each veth end when asked. Names carry the run's pid; ``teardown``
removes what ``setup`` made, also after a failure half-way.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class Loopback:
    """Workers as plain children on the host, against ``url``."""

    name = "loopback"

    def __init__(self, url: str) -> None:
        self.client_url = url

    def worker_url(self, slot: int) -> str:
        return self.client_url

    def wrap(self, slot: int) -> list[str]:
        return []

    def namespace_of(self, pid: int) -> str:
        return ""


def run_ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


def netns_unavailable() -> str | None:
    """Why netns mode cannot run here, or None when it can."""
    if shutil.which("ip") is None:
        return "no ip(8) command"
    if shutil.which("redis-server") is None:
        return "no redis-server binary for the private Redis"
    probe = f"scaleout-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip() or done.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


NET_BASE = ipaddress.IPv4Network("10.213.0.0/16")
LOCK = Path(tempfile.gettempdir()) / "scaleout-bench-netns.lock"


class Netns:
    """One network namespace per worker slot, a veth pair each, a private Redis.

    ``setup()`` records every name before it creates it, so ``teardown()`` removes what a
    failed or interrupted setup left half made."""

    name = "netns"

    def __init__(self, slots: int, *, link_delay_ms: float = 0.0) -> None:
        self.slots, self.link_delay_ms = slots, link_delay_ms
        self.tag = str(os.getpid())
        self.namespaces: list[str] = []
        self.veths: list[str] = []  # host ends (deleting one deletes its pair)
        self.host_addrs: list[str] = []
        self.worker_addrs: list[str] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.client_url = ""
        self.redis_dir: Path | None = None

    def _subnet(self) -> int:
        """A /24 of 10.213.0.0/16 with no address on this host (under the lock)."""
        shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
        used = set()
        for word in shown.stdout.split():
            addr = word.split("/")[0]
            try:
                ip = ipaddress.IPv4Address(addr)
            except ValueError:
                continue
            if ip in NET_BASE:
                used.add(int(ip.packed[2]))
        for c in range(256):
            if c not in used:
                return c
        raise RuntimeError("no free /24 left in 10.213.0.0/16")

    def setup(self) -> None:
        if self.slots > 63:
            raise ValueError("at most 63 worker slots per run (one /24 of /30s)")
        with open(LOCK, "w") as lock:  # parallel runs: pick and claim the /24 one at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            c = self._subnet()
            for i in range(self.slots):
                ns, host, peer = (
                    f"scaleout-{self.tag}-{i}",
                    f"so{self.tag}h{i}",
                    f"so{self.tag}w{i}",
                )
                host_ip, worker_ip = f"10.213.{c}.{4 * i + 1}", f"10.213.{c}.{4 * i + 2}"
                self.namespaces.append(ns)
                run_ip("netns", "add", ns)
                self.veths.append(host)
                run_ip("link", "add", host, "type", "veth", "peer", "name", peer)
                run_ip("link", "set", peer, "netns", ns)
                run_ip("addr", "add", f"{host_ip}/30", "dev", host)
                run_ip("link", "set", host, "up")
                run_ip("-n", ns, "addr", "add", f"{worker_ip}/30", "dev", peer)
                run_ip("-n", ns, "link", "set", peer, "up")
                run_ip("-n", ns, "link", "set", "lo", "up")
                self.host_addrs.append(host_ip)
                self.worker_addrs.append(worker_ip)
                if self.link_delay_ms:
                    delay = f"{self.link_delay_ms}ms"
                    for dev, where in ((host, []), (peer, ["-n", ns])):
                        done = subprocess.run(
                            ["tc", *where, "qdisc", "add", "dev", dev, "root", "netem"]
                            + ["delay", delay],
                            capture_output=True,
                            text=True,
                        )
                        if done.returncode != 0:
                            raise RuntimeError(
                                f"tc netem on {dev} failed ({done.stderr.strip()}): "
                                "this kernel lacks sch_netem; run without --link-delay-ms"
                            )
        self._start_redis()

    def _start_redis(self) -> None:
        self.port = free_port()
        self.redis_dir = Path(tempfile.mkdtemp(prefix=f"scaleout-redis-{self.tag}-"))
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", *self.host_addrs]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        argv += ["--dir", str(self.redis_dir), "--logfile", str(self.redis_dir / "redis.log")]
        with open(self.redis_dir / "stderr.log", "wb") as err:
            self.redis = subprocess.Popen(argv, stdout=err, stderr=err)
        self.client_url = f"redis://127.0.0.1:{self.port}/0"
        r = redis.Redis.from_url(self.client_url)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    r.ping()
                    return
                except redis.ConnectionError as error:
                    if self.redis.poll() is not None or time.monotonic() > deadline:
                        logs = [self.redis_dir / n for n in ("redis.log", "stderr.log")]
                        text = " ".join(f.read_text(errors="replace") for f in logs if f.exists())
                        raise RuntimeError(
                            f"private redis-server did not start: {text[-800:]}"
                        ) from error
                    time.sleep(0.05)
        finally:
            r.close()

    def worker_url(self, slot: int) -> str:
        return f"redis://{self.host_addrs[slot]}:{self.port}/0"

    def wrap(self, slot: int) -> list[str]:
        # ip netns exec execs the command: the Popen pid is the worker's own pid.
        return ["ip", "netns", "exec", self.namespaces[slot]]

    def namespace_of(self, pid: int) -> str:
        done = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
        return done.stdout.strip()

    def teardown(self) -> list[str]:
        """Remove everything ``setup()`` made; the errors, if any (each step is tried)."""
        errors: list[str] = []
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait(5)
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)
        for ns in self.namespaces:  # a worker left behind in a namespace: ours, by its name
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for host in self.veths:
            done = subprocess.run(["ip", "link", "del", host], capture_output=True, text=True)
            if done.returncode != 0 and "Cannot find device" not in done.stderr:
                errors.append(f"ip link del {host}: {done.stderr.strip()}")
        for ns in self.namespaces:
            done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if done.returncode != 0 and "No such file" not in done.stderr:
                errors.append(f"ip netns del {ns}: {done.stderr.strip()}")
        return errors


Placement = Loopback | Netns
