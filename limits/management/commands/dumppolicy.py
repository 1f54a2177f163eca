"""``manage.py dumppolicy``: print the whole quota model as a policy file."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from limits.policyfile import policy_dump


class Command(BaseCommand):
    help = (
        "Print every model class, AI model, tier and tenant with their rules and budgets in "
        "the policy file format that loadpolicy reads, in a fixed order: dumping, loading the "
        "dump and dumping again gives the same bytes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=("yaml", "json"), default="yaml")

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(policy_dump(file_format=options["format"]), ending="")
