"""The top-user rollups take the drain's new usage events from the table, by id, once per
drain: ``LedgerState`` ``users`` marks how far. Every event stored before this migration is
in them already (added directly, or waiting as a delta), so the mark starts at the newest."""

from django.db import migrations, models
from django.db.models import Max


def mark_newest(apps, schema_editor):
    newest = apps.get_model("billing", "UsageEvent").objects.aggregate(newest=Max("id"))["newest"]
    apps.get_model("billing", "LedgerState").objects.update_or_create(
        name="users", defaults={"position": newest or 0}
    )


def forget_mark(apps, schema_editor):
    apps.get_model("billing", "LedgerState").objects.filter(name="users").delete()


class Migration(migrations.Migration):
    dependencies = [("billing", "0006_rollup_fillfactor_reset")]

    operations = [
        migrations.AddField(
            model_name="ledgerstate",
            name="position",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(mark_newest, forget_mark),
    ]
