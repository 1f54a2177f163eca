"""Rollup pages full again (PostgreSQL's default).

0004 left half of each rollup page free so that the drain's per-batch updates of existing
buckets stayed on their page. The drain now updates the top-user rollups once per drain
(from ``UserUsageDelta``) and the other rollups a few hundred rows per batch, so the room no
longer pays for itself, while it doubled the pages that the finance pages and statements
read.
"""

from django.db import migrations

TABLES = (
    "billing_hourlyrollup",
    "billing_dailyrollup",
    "billing_monthlyrollup",
    "billing_dailyuserrollup",
    "billing_monthlyuserrollup",
)


def fill_pages(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"ALTER TABLE {table} RESET (fillfactor)")


def leave_room(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"ALTER TABLE {table} SET (fillfactor = 50)")


class Migration(migrations.Migration):
    dependencies = [("billing", "0005_user_usage_deltas")]

    operations = [migrations.RunPython(fill_pages, leave_room, elidable=True)]
