"""The two staff roles: operators edit limits; finance reads everything and changes nothing."""

from __future__ import annotations

from typing import Any

OPERATORS = "operators"
FINANCE = "finance"

# Models operators may add, change and delete. Everything else they may only view.
OPERATOR_EDITABLE = {
    ("limits", "tier"),
    ("limits", "modelclass"),
    ("limits", "aimodel"),
    ("limits", "tenant"),
    ("limits", "limitrule"),
    ("limits", "budget"),
    ("limits", "apikey"),
}
ROLE_APPS = ("limits", "billing")


def role_permissions_sync(apps: Any) -> None:
    """Create both groups and give them their permissions; safe to run again.

    Takes the app registry so that data migrations can call it with their historical one.
    """
    from django.apps import apps as global_apps
    from django.contrib.auth.management import create_permissions

    for app_config in global_apps.get_app_configs():
        if app_config.label in ROLE_APPS:
            create_permissions(app_config, verbosity=0, apps=apps)

    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    operators, _ = group_model.objects.get_or_create(name=OPERATORS)
    finance, _ = group_model.objects.get_or_create(name=FINANCE)

    permissions = permission_model.objects.filter(
        content_type__app_label__in=ROLE_APPS
    ).select_related("content_type")
    operator_permissions = []
    finance_permissions = []
    for permission in permissions:
        key = (permission.content_type.app_label, permission.content_type.model)
        if permission.codename.startswith("view_"):
            operator_permissions.append(permission)
            finance_permissions.append(permission)
        elif key in OPERATOR_EDITABLE:
            operator_permissions.append(permission)
    operators.permissions.set(operator_permissions)
    finance.permissions.set(finance_permissions)
