"""Image blobs' digest check: bytes that carry their SHA-256 (``DigestedBytes``, what
validation hands on) are checked against a reference without being hashed again; any other
bytes are hashed; a mismatch is refused either way."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from inference.client import blobs
from inference.client.blobs import BlobDigestMismatch, DigestedBytes, blob_check_digest
from inference.protocol import ImageRef


def _ref(data: bytes) -> ImageRef:
    return ImageRef(sha256=hashlib.sha256(data).hexdigest(), width=1, height=1)


def test_digested_bytes_carry_their_own_digest() -> None:
    data = DigestedBytes(b"P6\n1 1\n255\n\x01\x02\x03")
    assert data == b"P6\n1 1\n255\n\x01\x02\x03"
    assert data.sha256 == hashlib.sha256(data).hexdigest()
    again = pickle.loads(pickle.dumps(data))
    assert again == data and again.sha256 == data.sha256


def test_digested_bytes_are_not_hashed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    data = DigestedBytes(b"pixels" * 1000)
    right, wrong = _ref(bytes(data)), _ref(b"other")
    plain = b"pixels" * 1000
    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    def counting(payload: bytes = b"") -> object:
        hashed.append(len(payload))
        return real_sha256(payload)

    monkeypatch.setattr(blobs.hashlib, "sha256", counting)
    blob_check_digest(data=data, ref=right)
    with pytest.raises(BlobDigestMismatch):
        blob_check_digest(data=data, ref=wrong)
    assert hashed == []
    blob_check_digest(data=plain, ref=right)  # plain bytes: hashed, as before
    assert hashed == [len(plain)]


def test_plain_bytes_are_hashed_and_checked() -> None:
    blob_check_digest(data=b"pixels", ref=_ref(b"pixels"))
    with pytest.raises(BlobDigestMismatch):
        blob_check_digest(data=b"pixels", ref=_ref(b"other"))
