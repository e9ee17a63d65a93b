"""``GET /v1/models`` and ``GET /v1/models/<id>`` (OpenAI format).

Besides the served models the key may use, ``auto`` (routing picks the fast or the slow
model, docs/routing.md) is listed when a slow model is configured and the key may use one
of the two, as the playground offers it; ``/v1/models/auto`` answers whenever a request
may name it (without a slow model it is the fast model under another name).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.selectors.served_models import (
    ServedModel,
    model_get_for_principal,
    model_list_for_principal,
)
from webplatform.api.base import AuthenticatedApiView
from webplatform.api.schema import ModelListSchema, ModelSchema, error_responses
from webplatform.completions.model_choice import AUTO_MODEL, auto_offered, check_auto_allowed

# ``auto`` as a model: no creation time of its own, served by the platform's routing.
AUTO_ENTRY = ServedModel(id=AUTO_MODEL, created=0, owned_by="system")


class ModelOutputSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.SerializerMethodField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()

    def get_object(self, model: ServedModel) -> str:
        return "model"


class ModelListApi(AuthenticatedApiView):
    @extend_schema(
        operation_id="listModels",
        responses={200: ModelListSchema, **error_responses(401)},
        summary="List the models this key may use",
        description="The models this key may use: those served, allowed by your plan, and "
        "within the key's own model scope; and `auto` (the platform routes each request to "
        "its fast or its slow model) when a slow model is configured.",
    )
    def get(self, request: Request) -> Response:
        models = model_list_for_principal(principal=self.principal)
        if auto_offered(self.principal.allowed_models):
            models = [*models, AUTO_ENTRY]
        return Response({"object": "list", "data": ModelOutputSerializer(models, many=True).data})


class ModelDetailApi(AuthenticatedApiView):
    @extend_schema(
        operation_id="retrieveModel",
        responses={200: ModelSchema, **error_responses(401, 404)},
        summary="Retrieve one model",
        description="One model; `404 model_not_found` when this key may not use it.",
    )
    def get(self, request: Request, model_id: str) -> Response:
        if model_id == AUTO_MODEL:
            check_auto_allowed(principal=self.principal)  # 404 model_not_found otherwise
            return Response(ModelOutputSerializer(AUTO_ENTRY).data)
        model = model_get_for_principal(principal=self.principal, model_id=model_id)
        return Response(ModelOutputSerializer(model).data)
