"""Conversation reads, always through the tenant and the owner."""

from __future__ import annotations

from django.db.models import Q

from tenants.errors import ApplicationError
from tenants.principals import ApiPrincipal
from webplatform.completions.request import ChatTurn, Role, StoredImage
from webplatform.models import Conversation, ConversationTurn

# The roles a conversation stores (chat.services writes only these two).
_ROLES: dict[str, Role] = {"user": "user", "assistant": "assistant"}


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


def conversation_history(*, conversation: Conversation) -> tuple[ChatTurn, ...]:
    """The conversation's latest turns as the request path takes them: each turn's images
    (validated and stored when it was asked) before its text."""
    history = []
    for turn in conversation_turns(conversation=conversation):
        parts: list[str | StoredImage] = [
            StoredImage(sha256=i["sha256"], width=i["width"], height=i["height"])
            for i in turn.images
        ]
        parts.append(turn.text)
        history.append(ChatTurn(role=_ROLES[turn.role], parts=tuple(parts)))
    return tuple(history)


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except (ValueError, TypeError):
        return False
    return True
