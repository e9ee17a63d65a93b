"""``python -m inference.worker --model NAME`` (see ``inference.worker.main``)."""

from __future__ import annotations

from inference.worker.main import main

raise SystemExit(main())
