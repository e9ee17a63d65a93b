"""``POST /v1/chat/tickets``: a short-lived, single-use ticket to open the websocket chat."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from webplatform.api.base import AuthenticatedApiView
from webplatform.api.schema import error_responses
from webplatform.chat.tickets import chat_ticket_issue


class ChatTicketApi(AuthenticatedApiView):
    @extend_schema_serializer(component_name="ChatTicket")
    class OutputSerializer(serializers.Serializer):
        """A websocket ticket."""

        ticket = serializers.CharField()
        expires_in = serializers.IntegerField()
        url = serializers.CharField()

    @extend_schema(
        request=None,
        responses={201: OutputSerializer, **error_responses(401, 403)},
        summary="Issue a websocket ticket (valid once, for a minute)",
        description="A ticket to open the websocket chat from a browser without putting the "
        "API key in a URL: connect to `url` (`/ws/chat/?ticket=...`) within `expires_in` "
        "seconds; the ticket opens one connection.",
    )
    def post(self, request: Request) -> Response:
        ticket, expires_in = chat_ticket_issue(principal=self.principal)
        body = {"ticket": ticket, "expires_in": expires_in, "url": f"/ws/chat/?ticket={ticket}"}
        return Response(self.OutputSerializer(body).data, status=201)
