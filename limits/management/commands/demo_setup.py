"""``demo_setup``: the demo policy, an admin login and an API key, fresh on every run."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from limits.models import Tenant
from limits.services import Actor, apikey_create, apikey_revoke

ADMIN_USERNAME = "admin"
DEMO_TENANT = "acme"
DEMO_KEY_NAME = "demo"


class Command(BaseCommand):
    help = (
        "Load examples/policy.yaml, set a new random password for the superuser 'admin' and "
        "print it, and print a new demo API key for tenant acme (revoking the previous one)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        policy_file = settings.BASE_DIR / "examples" / "policy.yaml"
        if not policy_file.is_file():
            raise CommandError(f"the demo policy {policy_file} is missing")
        call_command("loadpolicy", str(policy_file), stdout=self.stdout, stderr=self.stderr)

        actor = Actor(label="demo_setup")
        password = secrets.token_urlsafe(12)
        with transaction.atomic():
            tenant = Tenant.objects.filter(slug=DEMO_TENANT).first()
            if tenant is None:
                raise CommandError(f"the demo policy defines no tenant {DEMO_TENANT!r}")
            user_model = get_user_model()
            admin, _ = user_model.objects.get_or_create(username=ADMIN_USERNAME)
            admin.is_staff = admin.is_superuser = admin.is_active = True
            admin.set_password(password)
            admin.save()
            # Only the newest demo key stays valid: the old ones were printed once and are
            # no longer on screen, so nobody should be holding them.
            for old_key in tenant.api_keys.filter(name=DEMO_KEY_NAME, revoked_at__isnull=True):
                apikey_revoke(api_key=old_key, actor=actor)
            _api_key, key = apikey_create(tenant=tenant, name=DEMO_KEY_NAME, actor=actor)

        self.stdout.write(f"admin login: {ADMIN_USERNAME} / {password}")
        self.stdout.write(f"demo API key for tenant {DEMO_TENANT}: {key}")
