"""CPU time per request, by process: where a level's requests spent the machine's CPU.

At one client a request's steps run one after another across processes (the client, the
web process, Redis, clamd, the worker, PostgreSQL), so the time of a request is about the
sum of what each process spent on it; beside the latencies this says which process the
platform's overhead is in. Read from ``/proc`` (Linux; elsewhere nothing is measured):
user + system time of

- ``client``: this process (the load client; in the ``engine`` mode the engine too);
- ``web``: a process under this one whose command line runs uvicorn (the ``embedded``
  mode's engine is in it), and everything under it;
- ``worker``: a process under this one running ``inference.worker``, and everything under
  it;
- ``other``: any other process under this one;
- ``redis``, ``clamd``, ``postgres``: every process of that name on the machine. These are
  shared services: other load on them counts too, and the ``embedded`` mode uses none.

A process counts for the part of the level it was seen in both snapshots, with the CPU of
its children that ended meanwhile (PostgreSQL's backends of connections opened and closed
within the level are in the postmaster's; a child that was running at the first snapshot
brings its earlier CPU too); a process that started or ended in between is left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
GROUPS = ("client", "web", "worker", "other", "redis", "clamd", "postgres")
# A service process's name (``comm``, as ``ps`` shows it) -> its group.
SERVICES = {"redis-server": "redis", "clamd": "clamd", "postgres": "postgres"}


@dataclass(frozen=True)
class _Proc:
    ppid: int
    comm: str
    ticks: int  # utime + stime, and cutime + cstime: its children that ended and were reaped


def _read(pid: int) -> _Proc | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:  # gone meanwhile, or not ours to read
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ")".
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return _Proc(ppid=int(fields[1]), comm=comm, ticks=sum(int(f) for f in fields[11:15]))


def _cmdline(pid: int) -> str:
    try:
        return (
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _own_group(cmdline: str) -> str | None:
    if "uvicorn" in cmdline:
        return "web"
    if "inference.worker" in cmdline:
        return "worker"
    return None


def snapshot(root: int | None = None) -> dict[int, tuple[str, int]]:
    """pid -> (group, CPU ticks) of every process this module counts; ``root``: the load
    client's pid (this process by default)."""
    root = os.getpid() if root is None else root
    procs: dict[int, _Proc] = {}
    if not PROC.is_dir():
        return {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (proc := _read(int(entry.name))) is not None:
            procs[int(entry.name)] = proc
    groups: dict[int, str | None] = {root: "client"}

    def group_of(pid: int) -> str | None:
        """The group of a process under ``root`` (None: not under it)."""
        if pid in groups:
            return groups[pid]
        proc = procs.get(pid)
        if proc is None or proc.ppid in (0, pid):
            groups[pid] = None
            return None
        groups[pid] = None  # a cycle (a pid reused meanwhile) ends here
        parent = group_of(proc.ppid)
        if parent is None:
            found = None
        elif parent == "client":  # right under the load client: what it runs
            found = _own_group(_cmdline(pid)) or "other"
        else:  # under a server: that server's
            found = parent
        groups[pid] = found
        return found

    out: dict[int, tuple[str, int]] = {}
    for pid, proc in procs.items():
        group = group_of(pid) or SERVICES.get(proc.comm)
        if group is not None:
            out[pid] = (group, proc.ticks)
    return out


def ms_per_request(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], requests: int
) -> dict[str, float]:
    """CPU ms per request of each group between two snapshots (groups that used none are
    left out)."""
    ticks = dict.fromkeys(GROUPS, 0)
    for pid, (group, end) in after.items():
        start = before.get(pid)
        if start is not None and start[0] == group:
            ticks[group] += end - start[1]
    if requests <= 0:
        return {}
    return {group: t * 1000 / TICKS_PER_S / requests for group, t in ticks.items() if t > 0}
