"""Virus scanning over clamd's INSTREAM protocol: verdicts, failure policy, the real clamd."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
from django.core.exceptions import ImproperlyConfigured

from tenants.errors import ApplicationError
from tests.fresh_interpreter import ROOT, python_json, web_env
from tests.webplatform.uploads import corpus
from webplatform.uploads import scanning, validation
from webplatform.uploads.clamd import ClamdAddress, ClamdClient, ClamdError, clamd_address_parse
from webplatform.uploads.scanning import (
    ScanVerdict,
    image_scan,
    image_scan_start,
    scanner_ping,
    scanning_enabled,
)
from webplatform.uploads.services import UploadLimits, upload_validate_image

LIMITS = UploadLimits(max_bytes=5 * corpus.MIB, max_pixels=40_000_000, max_images=4)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("tcp://127.0.0.1:3317", ClamdAddress(host="127.0.0.1", port=3317)),
        ("tcp://clamav:3310/", ClamdAddress(host="clamav", port=3310)),
        ("tcp://[::1]:3310", ClamdAddress(host="::1", port=3310)),
        ("unix:///var/run/clamav/clamd.ctl", ClamdAddress(path="/var/run/clamav/clamd.ctl")),
    ],
)
def test_clamd_url_forms(url: str, address: ClamdAddress) -> None:
    assert clamd_address_parse(url) == address
    assert str(address).startswith(url.split(":")[0])


@pytest.mark.parametrize(
    "url",
    ["clamav:3310", "tcp://clamav", "tcp://clamav:notaport", "http://clamav:3310", "unix://"],
)
def test_malformed_clamd_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        clamd_address_parse(url)


@pytest.mark.parametrize("url", ["none", "clamav:3310"])
def test_a_process_with_a_malformed_clamd_url_does_not_start(url: str) -> None:
    # Found with `benchmarks/api.py --clamd-url none`: every upload was a 500 instead.
    env = {**web_env(), "CLAMD_URL": url}
    started = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    assert "started" not in started.stdout
    assert "ImproperlyConfigured: CLAMD_URL must be tcp://host:port" in started.stderr
    env["CLAMD_URL"] = "tcp://clamav:3310"  # well formed (nothing listens: not read at start)
    assert python_json("import django, json; django.setup(); print(json.dumps(1))", env=env) == 1


def test_scanner_gets_the_original_bytes_in_chunks(fake_clamd) -> None:
    original = corpus.noise_jpeg(300)  # ~150 KB: several 64 KiB chunks
    image = upload_validate_image(source=corpus.data_uri(original), limits=LIMITS)
    assert image.scan is ScanVerdict.CLEAN
    assert fake_clamd.streams == [original]
    assert image.data != original
    assert len(fake_clamd.chunk_sizes) > 1 and max(fake_clamd.chunk_sizes) <= 64 * 1024
    assert fake_clamd.commands == [b"zINSTREAM\0"]


def test_a_scan_refusal_wins_over_a_decode_error(fake_clamd) -> None:
    # The stream is sent before the decode and its verdict read after: the decode of a
    # truncated JPEG fails first, and the client is still told what the scanner found.
    fake_clamd.reply = "stream: Win.Test.Fake-1 FOUND"
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.truncated_jpeg(), limits=LIMITS)
    assert caught.value.code == "malware_detected"
    assert fake_clamd.streams == [corpus.truncated_jpeg()]
    fake_clamd.reply = "stream: OK"
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.truncated_jpeg(), limits=LIMITS)
    assert caught.value.code == "image_decode_failed"


def test_a_verdict_sent_during_a_slow_decode_is_not_lost(fake_clamd, settings, monkeypatch):
    # The verdict's wait is bounded from when it is asked for: a decode slower than the
    # scanner's timeout must not turn clamd's answer (here FOUND) into a timeout.
    settings.CLAMD_TIMEOUT_SECONDS = 0.3
    fake_clamd.reply = "stream: Win.Test.Fake-1 FOUND"
    real_ppm = validation._ppm

    def slow_ppm(image):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return real_ppm(image)

    monkeypatch.setattr(validation, "_ppm", slow_ppm)
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
    assert caught.value.code == "malware_detected"


def test_a_silent_scanner_still_times_out_after_the_decode(fake_clamd, settings) -> None:
    settings.CLAMD_TIMEOUT_SECONDS = 0.3
    fake_clamd.reply = None  # reads the stream, never answers
    scan = image_scan_start(data=b"x" * 100)
    started = time.monotonic()
    with pytest.raises(ApplicationError) as caught:
        scan.result()
    assert caught.value.code == "scanner_unavailable"
    assert 0.25 <= time.monotonic() - started < 3


def test_found_is_malware_detected(fake_clamd, caplog) -> None:
    fake_clamd.reply = "stream: Win.Test.Fake-1 FOUND"
    with caplog.at_level(logging.WARNING, logger="webplatform.uploads.scanning"):
        with pytest.raises(ApplicationError) as caught:
            upload_validate_image(
                source=corpus.jpeg_with_metadata(), limits=LIMITS, param="messages[0].content[0]"
            )
    assert (caught.value.code, caught.value.status, caught.value.param) == (
        "malware_detected",
        400,
        "messages[0].content[0]",
    )
    assert "Win.Test.Fake-1" not in caught.value.message
    assert "Win.Test.Fake-1" in caplog.text


@pytest.mark.parametrize(
    "reply", ["INSTREAM size limit exceeded. ERROR", "Can't allocate memory ERROR", "gibberish"]
)
def test_scanner_error_fails_closed_when_required(fake_clamd, reply: str) -> None:
    fake_clamd.reply = reply
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS, param="p")
    error = caught.value
    assert (error.code, error.status, error.type) == ("scanner_unavailable", 503, "server_error")
    assert error.headers["Retry-After"].isdigit()


def test_scanner_error_skips_the_scan_when_not_required(fake_clamd, settings, caplog) -> None:
    fake_clamd.reply = "Can't allocate memory ERROR"
    settings.CLAMD_REQUIRED = False
    with caplog.at_level(logging.WARNING, logger="webplatform.uploads.scanning"):
        image = upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
    assert image.scan is ScanVerdict.SKIPPED
    assert "accepted unscanned" in caplog.text


def test_silent_scanner_times_out(fake_clamd, settings) -> None:
    fake_clamd.reply = None
    settings.CLAMD_TIMEOUT_SECONDS = 0.5
    started = time.monotonic()
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
    assert caught.value.code == "scanner_unavailable"
    assert time.monotonic() - started < 3


def test_unreachable_scanner_when_required(settings, closed_port_url) -> None:
    settings.CLAMD_URL = closed_port_url
    settings.CLAMD_REQUIRED = True
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
    assert (caught.value.code, caught.value.status) == ("scanner_unavailable", 503)
    assert scanning_enabled()
    assert scanner_ping() is False


def test_unreachable_scanner_when_not_required(settings, closed_port_url) -> None:
    settings.CLAMD_URL = closed_port_url
    settings.CLAMD_REQUIRED = False
    image = upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
    assert image.scan is ScanVerdict.SKIPPED


def test_unix_socket_that_does_not_exist(settings) -> None:
    settings.CLAMD_URL = "unix:///nonexistent/clamd.ctl"
    settings.CLAMD_REQUIRED = True
    with pytest.raises(ApplicationError) as caught:
        image_scan(data=b"x")
    assert caught.value.code == "scanner_unavailable"


def test_no_scanner_configured_but_required(settings) -> None:
    settings.CLAMD_REQUIRED = True
    with pytest.raises(ApplicationError) as caught:
        upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
    assert (caught.value.code, caught.value.status) == ("scanner_unavailable", 503)


def test_no_scanner_configured_skips_and_warns_once(caplog) -> None:
    assert not scanning_enabled()
    with caplog.at_level(logging.WARNING, logger="webplatform.uploads.scanning"):
        for _ in range(3):
            image = upload_validate_image(source=corpus.jpeg_with_metadata(), limits=LIMITS)
            assert image.scan is ScanVerdict.SKIPPED
    assert caplog.text.count("NOT virus-scanned") == 1
    assert scanner_ping() is False


def test_ping(fake_clamd) -> None:
    assert scanner_ping() is True
    assert ClamdClient(clamd_address_parse(fake_clamd.url), timeout=2).ping() is True


def test_client_errors_are_clamd_errors(closed_port_url) -> None:
    client = ClamdClient(clamd_address_parse(closed_port_url), timeout=1)
    with pytest.raises(ClamdError):
        client.instream(b"data")
    with pytest.raises(ClamdError):
        client.ping()


# --- the real clamd (scripts/clamd-test.sh, shipped EICAR signature) ----------------------


def test_real_clamd_answers_ping(real_clamd) -> None:
    assert scanner_ping() is True


def test_real_clamd_finds_bare_eicar(real_clamd) -> None:
    client = ClamdClient(clamd_address_parse(real_clamd), timeout=10)
    assert client.instream(corpus.eicar()) == "VisionPlatform.Test.EICAR.UNOFFICIAL"
    assert client.instream(corpus.jpeg_with_metadata()) is None
    with pytest.raises(ApplicationError) as caught:
        image_scan(data=corpus.eicar(), param="p")
    assert caught.value.code == "malware_detected"


def test_real_clamd_scans_a_large_image(real_clamd) -> None:
    image = upload_validate_image(source=corpus.noise_png(4 * corpus.MIB), limits=LIMITS)
    assert image.scan is ScanVerdict.CLEAN


# --- the verdict read later, on the event loop (the request path's ScanVerdicts) ---------


async def test_a_started_scan_gives_its_verdict_on_the_event_loop(fake_clamd) -> None:
    original = corpus.noise_jpeg(200)
    image, scan = validation.image_validate_start(data=original, max_bytes=5 * corpus.MIB)

    assert image.scan is ScanVerdict.PENDING
    assert await scan.result_async() is ScanVerdict.CLEAN
    assert fake_clamd.streams == [original]


async def test_a_started_scan_refuses_on_the_event_loop(fake_clamd) -> None:
    fake_clamd.reply = "stream: Win.Test.EICAR_HDB-1 FOUND"
    _image, scan = validation.image_validate_start(
        data=corpus.noise_jpeg(200), max_bytes=5 * corpus.MIB, param="p"
    )

    with pytest.raises(ApplicationError) as caught:
        await scan.result_async()
    assert (caught.value.code, caught.value.param) == ("malware_detected", "p")


async def test_a_silent_scanner_times_out_on_the_event_loop(fake_clamd, settings) -> None:
    fake_clamd.reply = None
    settings.CLAMD_TIMEOUT_SECONDS = 0.5
    _image, scan = validation.image_validate_start(
        data=corpus.jpeg_with_metadata(), max_bytes=5 * corpus.MIB
    )
    started = time.monotonic()

    with pytest.raises(ApplicationError) as caught:
        await scan.result_async()
    assert caught.value.code == "scanner_unavailable"
    assert 0.4 < time.monotonic() - started < 3


async def test_no_scanner_configured_gives_its_policy_on_the_event_loop(settings, caplog) -> None:
    def started() -> scanning.ImageScan:
        return validation.image_validate_start(
            data=corpus.jpeg_with_metadata(), max_bytes=5 * corpus.MIB
        )[1]

    skipped = started()
    assert skipped.decided
    assert await skipped.result_async() is ScanVerdict.SKIPPED
    settings.CLAMD_REQUIRED = True
    refused = started()
    with caplog.at_level(logging.ERROR, logger="webplatform.uploads.scanning"):
        for _ in range(2):  # judged (and logged) once however often it is asked
            with pytest.raises(ApplicationError) as caught:
                await refused.result_async()
            assert caught.value.code == "scanner_unavailable"
    assert caplog.text.count("CLAMD_REQUIRED is set but CLAMD_URL is empty") == 1


def test_scans_in_flight_are_bounded_per_process(fake_clamd, settings) -> None:
    settings.CLAMD_MAX_SCANS_IN_FLIGHT = 1
    settings.CLAMD_TIMEOUT_SECONDS = 0.3
    data = corpus.jpeg_with_metadata()
    first = image_scan_start(data=data, param="first")  # its verdict not read yet

    started = time.monotonic()
    second = image_scan_start(data=data, param="second")  # waits for a slot, then fails
    with pytest.raises(ApplicationError) as caught:
        second.result()
    assert caught.value.code == "scanner_unavailable"
    assert time.monotonic() - started >= 0.3
    assert first.result() is ScanVerdict.CLEAN  # reading the verdict frees the slot
    assert fake_clamd.commands == [b"zINSTREAM\0"]  # the second never reached clamd

    assert image_scan_start(data=data).result() is ScanVerdict.CLEAN
    given_up = image_scan_start(data=data)
    given_up.close()  # so does giving it up
    assert image_scan_start(data=data).result() is ScanVerdict.CLEAN


async def test_a_request_gone_while_its_images_validate_gives_every_scan_slot_back(
    fake_clamd, settings, caplog
) -> None:
    import asyncio

    from webplatform.completions.request import ChatCompletionInput, ChatTurn, ImageSource
    from webplatform.completions.validation import images_validate
    from webplatform.uploads.services import UploadLimits

    settings.CLAMD_MAX_SCANS_IN_FLIGHT = 2
    # Both verdicts refusals: each must still be read, and logged, with nobody waiting.
    fake_clamd.reply = "stream: Eicar-Test-Signature FOUND"
    caplog.set_level(logging.WARNING, logger="webplatform.uploads.scanning")
    small = ImageSource(url=corpus.data_uri(corpus.noise_jpeg(60), "image/jpeg"), param="a")
    large = ImageSource(url=corpus.data_uri(corpus.noise_jpeg(1500), "image/jpeg"), param="b")
    inp = ChatCompletionInput(model="m", turns=(ChatTurn(role="user", parts=(small, large)),))
    validating = asyncio.ensure_future(
        images_validate(inp=inp, limits=UploadLimits(max_bytes=20 * corpus.MIB))
    )
    deadline = time.monotonic() + 5
    # Both scans at clamd (the fake serves one connection at a time: it reads the large
    # image's command once the small one's verdict is out), so both hold a slot; the large
    # image is still being sent or decoded. Waiting only for the small one's stream let the
    # test take both slots before the large image's validation asked for one.
    while len(fake_clamd.commands) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)

    validating.cancel()  # the client went away, the large one still decoding
    with pytest.raises(asyncio.CancelledError):
        await validating

    slots = scanning._scan_slots(2)
    deadline = time.monotonic() + 5
    for _ in range(2):  # both slots come back once clamd answered (on the event loop)
        while not slots.acquire(blocking=False):
            assert time.monotonic() < deadline, "a scan slot was never given back"
            await asyncio.sleep(0.01)
    assert len(fake_clamd.streams) == 2  # both images were still scanned
    # ... and both verdicts read (the large image's slot alone could come back by the
    # scan's finalizer, without its verdict ever read or its connection closed).
    deadline = time.monotonic() + 5
    while caplog.text.count("malware detected in upload") < 2:
        assert time.monotonic() < deadline, caplog.text
        await asyncio.sleep(0.01)
