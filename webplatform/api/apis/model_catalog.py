"""``GET /v1/models`` and ``GET /v1/models/<id>`` (OpenAI format)."""

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
        "within the key's own model scope.",
    )
    def get(self, request: Request) -> Response:
        models = model_list_for_principal(principal=self.principal)
        return Response({"object": "list", "data": ModelOutputSerializer(models, many=True).data})


class ModelDetailApi(AuthenticatedApiView):
    @extend_schema(
        operation_id="retrieveModel",
        responses={200: ModelSchema, **error_responses(401, 404)},
        summary="Retrieve one model",
        description="One model; `404 model_not_found` when this key may not use it.",
    )
    def get(self, request: Request, model_id: str) -> Response:
        model = model_get_for_principal(principal=self.principal, model_id=model_id)
        return Response(ModelOutputSerializer(model).data)
