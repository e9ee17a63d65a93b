"""Shared fixtures. Tests run against the real PostgreSQL and Redis when DATABASE_URL and
REDIS_URL are set (``make test`` sets them); the embedded mode has its own tests."""

from __future__ import annotations
