"""``createapikey SLUG --name NAME``: a new API key for a tenant, printed once."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from limits.identifiers import InvalidIdentifier, normalize_slug
from limits.models import Tenant
from limits.services import Actor, apikey_create


class Command(BaseCommand):
    help = (
        "Create an API key for a tenant. The key is the last line of output; store it now, "
        "nothing can show it again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="The tenant's slug, e.g. acme.")
        parser.add_argument("--name", required=True, help="What the key is for (1-100 chars).")

    def handle(self, *args: Any, slug: str, name: str, **options: Any) -> None:
        try:
            normalized = normalize_slug(slug)
        except InvalidIdentifier as error:
            raise CommandError(f"tenant slug {slug!r} {error}") from None
        tenant = Tenant.objects.filter(slug=normalized).first()
        if tenant is None:
            raise CommandError(f"no tenant with slug {normalized!r}")
        try:
            api_key, key = apikey_create(
                tenant=tenant, name=name, actor=Actor(label="createapikey")
            )
        except ValidationError as error:
            raise CommandError("; ".join(error.messages)) from None
        self.stdout.write(
            f"Created API key {api_key.name!r} for tenant {tenant.slug} "
            f"(prefix {api_key.prefix}). Store it now; it cannot be shown again:"
        )
        self.stdout.write(key)
