"""``ScanVerdicts``: a request's scan verdicts, read on the event loop while it goes on.

Each scan here is a real ``PendingScan`` on one end of a socket pair; the test plays clamd
on the other end, so it decides when, and in which order, the verdicts come.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tenants.errors import ApplicationError
from webplatform.completions.validation import ScanVerdicts, _verdict_read
from webplatform.uploads.clamd import ClamdAddress, ClamdClient, PendingScan
from webplatform.uploads.scanning import ImageScan

FOUND = b"stream: Win.Test.EICAR_HDB-1 FOUND\0"
CLEAN = b"stream: OK\0"


@pytest.fixture(autouse=True)
def _scanning_required(settings):
    settings.CLAMD_URL = "tcp://127.0.0.1:1"  # never dialled: the scans are already sent
    settings.CLAMD_REQUIRED = True


def _verdicts(*scans: ImageScan) -> ScanVerdicts:
    """As the request path makes them: each scan's verdict read from now on."""
    return ScanVerdicts([_verdict_read(scan) for scan in scans])


def _scan(param: str) -> tuple[ImageScan, socket.socket]:
    ours, clamd = socket.socketpair()
    client = ClamdClient(ClamdAddress(host="127.0.0.1", port=1), timeout=5)
    return ImageScan(data_size=1, param=param, pending=PendingScan(client, ours)), clamd


async def test_every_image_clean_passes() -> None:
    scans = [_scan("a"), _scan("b")]
    verdicts = _verdicts(*(scan for scan, _ in scans))
    for _, clamd in scans:
        clamd.sendall(CLEAN)

    await verdicts.passed()
    await verdicts.passed()  # asked again: the same outcome


async def test_the_first_refused_image_in_the_clients_order_is_the_error() -> None:
    (first, first_clamd), (second, second_clamd) = _scan("first"), _scan("second")
    verdicts = _verdicts(first, second)
    second_clamd.sendall(FOUND)  # the later image's refusal comes first
    await asyncio.sleep(0.05)
    first_clamd.sendall(FOUND)

    with pytest.raises(ApplicationError) as caught:
        await verdicts.passed()
    assert (caught.value.code, caught.value.param) == ("malware_detected", "first")


async def test_nothing_passes_before_the_last_verdict() -> None:
    (first, first_clamd), (second, second_clamd) = _scan("first"), _scan("second")
    verdicts = _verdicts(first, second)
    first_clamd.sendall(CLEAN)

    waiting = asyncio.ensure_future(verdicts.passed())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    second_clamd.sendall(CLEAN)
    await asyncio.wait_for(waiting, 2)


async def test_a_scanner_that_hangs_up_is_unavailable() -> None:
    scan, clamd = _scan("p")
    verdicts = _verdicts(scan)
    clamd.close()

    with pytest.raises(ApplicationError) as caught:
        await verdicts.passed()
    assert (caught.value.code, caught.value.status) == ("scanner_unavailable", 503)


async def test_a_refusal_runs_the_callback_at_once() -> None:
    (first, first_clamd), (second, second_clamd) = _scan("first"), _scan("second")
    verdicts = _verdicts(first, second)
    called = asyncio.Event()
    verdicts.when_refused(called.set)
    assert not verdicts.done()
    second_clamd.sendall(FOUND)
    first_clamd.sendall(CLEAN)

    await asyncio.wait_for(called.wait(), 2)  # nobody waits on passed(): it ran anyway
    assert verdicts.done()
    with pytest.raises(ApplicationError) as caught:
        await verdicts.passed()
    assert caught.value.param == "second"


async def test_a_waiter_that_goes_away_leaves_the_read_to_its_end(caplog) -> None:
    scan, clamd = _scan("p")
    verdicts = _verdicts(scan)
    waiter = asyncio.ensure_future(verdicts.passed())
    await asyncio.sleep(0.05)

    waiter.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clamd.sendall(FOUND)
    with pytest.raises(ApplicationError):
        await asyncio.wait_for(verdicts.passed(), 2)  # the read went on: it has the verdict

    assert "malware detected in upload" in caplog.text  # still logged
    clamd.settimeout(1)
    assert clamd.recv(10) == b""  # and our end closed


async def test_no_images_pass_at_once() -> None:
    await ScanVerdicts([]).passed()
