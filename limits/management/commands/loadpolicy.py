"""``manage.py loadpolicy FILE``: make the quota model say what a policy file says."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from limits.policyfile import PolicyFileError, file_format_for, policy_load
from limits.services import Actor


class Command(BaseCommand):
    help = (
        "Load a policy file (YAML or JSON; - reads standard input). The whole file is checked "
        "first; if anything is wrong, every problem is listed with its path in the file and "
        "nothing is changed. Otherwise the model classes, AI models, tiers and tenants it "
        "lists are created or updated in one transaction, audited and published once. For "
        "each class, tier and tenant in the file, its capacity rules, limits and budgets "
        "become exactly those in the file (others are deleted). Classes, tiers, tenants and "
        "models the file does not mention are left untouched, and so are API keys. Loading "
        "the same file again changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="Policy file (.yaml, .yml or .json), or - for stdin.")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check the file and list what would change, but write nothing.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name: str = options["file"]
        try:
            if name == "-":
                text, source = sys.stdin.read(), "standard input"
            else:
                text, source = Path(name).read_text(encoding="utf-8-sig"), Path(name).name
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"cannot read {name}: {error}") from None
        try:
            result = policy_load(
                text=text,
                actor=Actor(label="loadpolicy"),
                reason=f"loadpolicy {source}",
                file_format=file_format_for(name),
                dry_run=options["dry_run"],
            )
        except PolicyFileError as error:
            count = len(error.problems)
            header = f"{source}: {count} problem{'s' if count != 1 else ''}, nothing was changed"
            raise CommandError("\n".join([header, *error.problems])) from None

        for line in result.lines():
            self.stdout.write(f"  {line}")
        counts = (
            f"{len(result.created)} created, {len(result.changed)} changed, "
            f"{len(result.deleted)} deleted"
        )
        if result.is_unchanged:
            self.stdout.write(f"{source}: nothing changed; the database already matches the file.")
        elif result.dry_run:
            self.stdout.write(f"{source}: dry run, nothing was written (would be {counts}).")
        else:
            self.stdout.write(self.style.SUCCESS(f"{source}: loaded and published ({counts})."))
