"""Login brute-force lock-out: failed attempts counted per (IP, username) and per IP.

Counters live in the Django cache (Redis in production, so every web process sees the same
counts). A counter's window starts at its first failure and is not extended by later ones,
so a locked-out client is let in again ``LOGIN_LOCKOUT_SECONDS`` after its first failure.

Why not django-axes: it needs its app, authentication backend and middleware in the
settings (and its own tables); this is the whole of what the dashboard needs from it.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.cache import cache

from tenants.errors import ApplicationError


def _limits() -> tuple[int, int, int]:
    return (
        getattr(settings, "LOGIN_FAILURES_PER_USER", 5),
        getattr(settings, "LOGIN_FAILURES_PER_IP", 50),
        getattr(settings, "LOGIN_LOCKOUT_SECONDS", 15 * 60),
    )


def _keys(*, ip: str, username: str) -> tuple[str, str]:
    user_digest = hashlib.sha256(f"{ip}|{username.strip().lower()}".encode()).hexdigest()[:32]
    return f"login-fail:user:{user_digest}", f"login-fail:ip:{ip}"


def login_attempt_check(*, ip: str, username: str) -> None:
    """Raise ApplicationError 429 ``login_locked_out`` while this client is locked out."""
    per_user, per_ip, seconds = _limits()
    user_key, ip_key = _keys(ip=ip, username=username)
    counts = cache.get_many([user_key, ip_key])
    if counts.get(user_key, 0) >= per_user or counts.get(ip_key, 0) >= per_ip:
        raise ApplicationError(
            "Too many failed log-in attempts. Please try again later.",
            code="login_locked_out",
            status=429,
            headers={"Retry-After": str(seconds)},
        )


def login_failure_record(*, ip: str, username: str) -> None:
    """Count one failed attempt (atomic ``add`` then ``incr``, safe across processes)."""
    _, _, seconds = _limits()
    for key in _keys(ip=ip, username=username):
        if not cache.add(key, 1, timeout=seconds):
            try:
                cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.add(key, 1, timeout=seconds)


def login_success_reset(*, ip: str, username: str) -> None:
    """A successful log-in clears this user's counter (not the IP's)."""
    user_key, _ = _keys(ip=ip, username=username)
    cache.delete(user_key)
