from __future__ import annotations

from django.apps import AppConfig


class WebplatformConfig(AppConfig):
    name = "webplatform"
    verbose_name = "Web platform"
