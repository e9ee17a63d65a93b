"""``inference.client.held_images``: what the Redis and upstream transports hold for the
requests that put an image."""

from __future__ import annotations

from inference.client import held_images
from inference.client.held_images import HeldImages


def test_an_image_is_held_until_every_request_that_put_it_took_it() -> None:
    images = HeldImages(max_age_s=60)
    images.put(tenant_id="t1", sha256="a", data=b"A")
    images.put(tenant_id="t1", sha256="a", data=b"A")  # a second request, same image
    assert images.take(tenant_id="t1", sha256s=["a", "b"]) == {"a": b"A"}  # b: stored before
    assert len(images) == 1
    assert images.take(tenant_id="t1", sha256s=["a"]) == {"a": b"A"}
    assert len(images) == 0
    assert images.take(tenant_id="t1", sha256s=["a"]) == {}


def test_a_tenant_takes_only_its_own_images() -> None:
    images = HeldImages(max_age_s=60)
    images.put(tenant_id="t1", sha256="a", data=b"A")
    assert images.take(tenant_id="t2", sha256s=["a"]) == {}
    assert len(images) == 1


def test_an_image_nobody_took_is_dropped_after_its_max_age(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(held_images.time, "monotonic", lambda: now[0])
    images = HeldImages(max_age_s=60)
    images.put(tenant_id="t1", sha256="old", data=b"O")
    now[0] += 61
    images.put(tenant_id="t1", sha256="new", data=b"N")  # a put sweeps the stale ones
    assert len(images) == 1
    assert images.take(tenant_id="t1", sha256s=["old", "new"]) == {"new": b"N"}
