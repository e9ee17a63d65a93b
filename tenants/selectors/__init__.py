"""Reads. Every read of tenant data takes the tenant (or a principal that carries it).

The modules group them by entity; the names most callers need are re-exported here.
"""

from __future__ import annotations

from tenants.selectors.api_keys import (
    api_key_get_for_operator,
    api_key_get_for_tenant,
    api_key_list_for_tenant,
)
from tenants.selectors.served_models import model_get_for_principal, model_list_for_principal
from tenants.selectors.tenants import (
    member_principal_get,
    membership_get,
    served_model_names,
    tenant_limits_get,
)
from tenants.selectors.usage import usage_today_for_tenant

__all__ = [
    "api_key_get_for_operator",
    "api_key_get_for_tenant",
    "api_key_list_for_tenant",
    "member_principal_get",
    "membership_get",
    "model_get_for_principal",
    "model_list_for_principal",
    "served_model_names",
    "tenant_limits_get",
    "usage_today_for_tenant",
]
