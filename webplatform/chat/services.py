"""Conversation writes: a websocket conversation keeps its history server-side."""

from __future__ import annotations

from django.db import transaction

from tenants.principals import ApiPrincipal
from webplatform.models import Conversation, ConversationTurn


def conversation_create(*, principal: ApiPrincipal, model: str) -> Conversation:
    return Conversation.objects.create(
        tenant=principal.tenant, user=principal.user, api_key=principal.api_key, model=model
    )


@transaction.atomic
def conversation_turns_append(
    *,
    conversation: Conversation,
    user_text: str,
    user_images: list[dict[str, int | str]],
    assistant_text: str,
) -> None:
    """Append one exchange (the user's turn and the answer) to the conversation."""
    ConversationTurn.objects.bulk_create(
        [
            ConversationTurn(
                conversation=conversation,
                tenant_id=conversation.tenant_id,
                role="user",
                text=user_text,
                images=user_images,
            ),
            ConversationTurn(
                conversation=conversation,
                tenant_id=conversation.tenant_id,
                role="assistant",
                text=assistant_text,
            ),
        ]
    )
    conversation.save(update_fields=["updated_at"])
