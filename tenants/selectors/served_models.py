"""The model catalogue as a principal sees it (``GET /v1/models``)."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from tenants.errors import ApplicationError
from tenants.principals import ApiPrincipal


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str
    created: int  # Unix seconds; settings.INFERENCE_MODELS[name]["created"], else 0
    owned_by: str


def _served_model(name: str) -> ServedModel:
    config = settings.INFERENCE_MODELS[name]
    return ServedModel(
        id=name,
        created=int(config.get("created", 0)),
        owned_by=str(config.get("owned_by", "system")),
    )


def model_list_for_principal(*, principal: ApiPrincipal) -> list[ServedModel]:
    """Served models the principal may use: served, allowed by the plan, in the key's scope."""
    return [_served_model(name) for name in principal.allowed_models]


def model_get_for_principal(*, principal: ApiPrincipal, model_id: str) -> ServedModel:
    """One model the principal may use; 404 ``model_not_found`` otherwise.

    An existing model the key may not use is reported exactly like a missing one, as OpenAI
    does, so a key cannot probe what other plans serve.
    """
    if model_id not in principal.allowed_models:
        raise ApplicationError(
            f"The model `{model_id}` does not exist or you do not have access to it.",
            code="model_not_found",
            status=404,
            param="model",
        )
    return _served_model(model_id)
