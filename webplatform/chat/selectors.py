"""Conversation reads, always through the tenant and the owner."""

from __future__ import annotations

from django.db.models import Q

from tenants.errors import ApplicationError
from tenants.principals import ApiPrincipal
from webplatform.models import Conversation, ConversationTurn


def conversation_get_for_principal(
    *, principal: ApiPrincipal, conversation_id: str
) -> Conversation:
    """The principal's own conversation; anyone else's (or none) is ``conversation_not_found``.

    Owned means same tenant and same owner: the dashboard user, or the API key.
    """
    owner = Q(user=principal.user) if principal.user is not None else Q(api_key=principal.api_key)
    conversation = (
        Conversation.objects.filter(owner, tenant=principal.tenant, pk=conversation_id).first()
        if _is_uuid(conversation_id)
        else None
    )
    if conversation is None:
        raise ApplicationError(
            "No such conversation.", code="conversation_not_found", status=404, param="conversation"
        )
    return conversation


def conversation_turns(*, conversation: Conversation, limit: int = 40) -> list[ConversationTurn]:
    turns = ConversationTurn.objects.filter(
        conversation=conversation, tenant_id=conversation.tenant_id
    ).order_by("-id")[:limit]
    return list(reversed(turns))


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except (ValueError, TypeError):
        return False
    return True
