"""Rows owned by the public surface: websocket chat conversations.

Every row carries its tenant; every read goes through a selector that takes the tenant and
the owner (dashboard user or API key), so a conversation id alone opens nothing.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="conversations"
    )
    # Exactly one owner: the dashboard user who chats, or the API key a client uses.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE
    )
    api_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.CASCADE)
    model = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "updated_at"])]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False) | models.Q(api_key__isnull=False),
                name="conversation_has_owner",
            )
        ]

    def __str__(self) -> str:
        return f"conversation {self.pk} ({self.tenant_id})"


class ConversationTurn(models.Model):
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="turns")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE)
    role = models.CharField(max_length=16)
    text = models.TextField(blank=True)
    # Validated images of this turn by content hash: [{"sha256", "width", "height"}]. The
    # bytes live in the tenant-scoped blob store with a TTL; a later turn refers to them.
    images = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.role} turn of {self.conversation_id}"
