"""Routes under /v1/. Keep ``UnknownPathApi`` last: it answers every other path."""

from __future__ import annotations

from django.urls import path, re_path

from webplatform.api.apis.chat_tickets import ChatTicketApi
from webplatform.api.apis.model_catalog import ModelDetailApi, ModelListApi
from webplatform.api.apis.unknown_path import UnknownPathApi
from webplatform.api.apis.usage import UsageApi
from webplatform.api.chat_completions import ChatCompletionsApi
from webplatform.api.rejections import rejections_recorded

urlpatterns = [
    re_path(r"^models/?$", ModelListApi.as_view(), name="api-model-list"),
    path("models/<path:model_id>", ModelDetailApi.as_view(), name="api-model-detail"),
    re_path(r"^usage/?$", UsageApi.as_view(), name="api-usage"),
    re_path(
        r"^chat/completions/?$",
        rejections_recorded(ChatCompletionsApi.as_view()),
        name="api-chat-completions",
    ),
    re_path(r"^chat/tickets/?$", ChatTicketApi.as_view(), name="api-chat-tickets"),
    re_path(r"", UnknownPathApi.as_view(), name="api-unknown-path"),
]
