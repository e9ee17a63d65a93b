"""``POST /v1/chat/tickets``: a short-lived, single-use ticket to open the websocket chat."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from webplatform.api.base import AuthenticatedApiView
from webplatform.chat.tickets import chat_ticket_issue


class ChatTicketApi(AuthenticatedApiView):
    class OutputSerializer(serializers.Serializer):
        ticket = serializers.CharField()
        expires_in = serializers.IntegerField()
        url = serializers.CharField()

    @extend_schema(
        request=None,
        responses={201: inline_serializer("ChatTicket", {"ticket": serializers.CharField()})},
        summary="Issue a websocket ticket (valid once, for a minute)",
    )
    def post(self, request: Request) -> Response:
        ticket, expires_in = chat_ticket_issue(principal=self.principal)
        body = {"ticket": ticket, "expires_in": expires_in, "url": f"/ws/chat/?ticket={ticket}"}
        return Response(self.OutputSerializer(body).data, status=201)
