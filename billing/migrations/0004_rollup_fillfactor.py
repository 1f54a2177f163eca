"""Room on every page of the rollup tables for the drain's updates.

Each drained batch adds to rollup rows that already exist. With full pages (PostgreSQL's
default) every such update moves the row to another page and writes a new entry in each of
the table's indexes; with free room on the page the update stays there and touches no index
(a heap-only tuple). Only pages written from now on leave the room.
"""

from django.db import migrations

TABLES = (
    "billing_hourlyrollup",
    "billing_dailyrollup",
    "billing_monthlyrollup",
    "billing_dailyuserrollup",
    "billing_monthlyuserrollup",
)


def leave_room(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"ALTER TABLE {table} SET (fillfactor = 50)")


def fill_pages(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"ALTER TABLE {table} RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [("billing", "0003_monthly_rollups")]

    operations = [migrations.RunPython(leave_room, fill_pages, elidable=False)]
