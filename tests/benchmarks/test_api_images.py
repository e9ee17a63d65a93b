"""The image sets of ``benchmarks/api.py``: what each claims to be, all different, and sent
with the right media type and ``detail``."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from apibench.request import distinct_photos, distinct_screenshots, request_body
from apibench.setups import clamd_url_of


def _image_url(body: bytes) -> dict[str, str]:
    return json.loads(body)["messages"][0]["content"][0]["image_url"]


def test_photos_are_distinct_12_megapixel_jpegs() -> None:
    photos = distinct_photos(2)
    assert photos[0] != photos[1]
    for photo in photos:
        image = Image.open(io.BytesIO(photo))
        assert (image.format, image.size) == ("JPEG", (4000, 3000))
    url = _image_url(request_body(photos[0], "low"))
    assert url["detail"] == "low"
    assert url["url"].startswith("data:image/jpeg;base64,")


def test_screenshots_are_distinct_full_hd_pngs() -> None:
    shots = distinct_screenshots(2)
    assert shots[0] != shots[1]
    for shot in shots:
        image = Image.open(io.BytesIO(shot))
        assert (image.format, image.size) == ("PNG", (1920, 1080))
    url = _image_url(request_body(shots[0]))
    assert "detail" not in url
    prefix = "data:image/png;base64,"
    assert url["url"].startswith(prefix)
    assert base64.b64decode(url["url"][len(prefix) :]) == shots[0]


def test_the_engine_floor_gets_exactly_what_validation_hands_the_worker() -> None:
    from apibench.request import distinct_jpegs
    from apibench.targets import EngineTarget

    from webplatform.uploads.validation import image_validate

    jpeg = distinct_jpegs(1)[0]
    # prepare() needs no engine: called unbound, as the benchmark calls it before timing.
    data, ref = EngineTarget.prepare(object.__new__(EngineTarget), jpeg)
    validated = image_validate(data=jpeg, max_bytes=len(jpeg), pixel_budget=1_254_400)
    assert data == validated.data
    assert ref == validated.ref()


def test_the_benchmark_serves_with_the_flags_make_run_gives_uvicorn() -> None:
    from apibench.processes import production_server_flags

    flags = production_server_flags()
    assert flags[flags.index("--loop") + 1] == "uvloop"
    assert flags[flags.index("--http") + 1] == "webplatform.server:HeaderLimitsHttpToolsProtocol"


def test_another_salt_gives_other_bytes_of_the_same_kind() -> None:
    """A run's salt: no image of an earlier run comes again (clamd would answer it from its
    cache of clean verdicts), while each set keeps its size and type."""
    from apibench.request import IMAGE_SETS

    for name, make in IMAGE_SETS.items():
        first, second = make(2, salt=1), make(2, salt=2)
        assert make(2, salt=1) == first, name  # a salt is reproducible
        assert not set(first) & set(second), name
        for a, b in zip(first, second, strict=True):
            image_a, image_b = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
            assert (image_a.format, image_a.size) == (image_b.format, image_b.size), name
            assert abs(len(a) - len(b)) < 0.05 * len(a), name


def test_clamd_none_turns_scanning_off_whichever_way_it_is_given() -> None:
    env = {"CLAMD_URL": "tcp://127.0.0.1:3317"}
    assert clamd_url_of("", env) == "tcp://127.0.0.1:3317"
    assert clamd_url_of("unix:///run/clamd.ctl", env) == "unix:///run/clamd.ctl"
    assert clamd_url_of("none", env) == ""  # documented as "no scan", not a scanner's address
    assert clamd_url_of("", {"CLAMD_URL": "None"}) == ""
    assert clamd_url_of("", {}) == ""
