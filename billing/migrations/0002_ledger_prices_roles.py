import datetime

from django.db import migrations

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def forwards(apps, schema_editor):
    from limits.roles import role_permissions_sync

    apps.get_model("billing", "LedgerState").objects.get_or_create(name="drain")
    # Every existing model's current price has applied since the beginning.
    model_price = apps.get_model("billing", "ModelPrice")
    for ai_model in apps.get_model("limits", "AIModel").objects.all():
        if not model_price.objects.filter(model_id=ai_model.model_id).exists():
            model_price.objects.create(
                model_id=ai_model.model_id,
                input_price_per_1k=ai_model.input_price_per_1k,
                output_price_per_1k=ai_model.output_price_per_1k,
                valid_from=EPOCH,
            )
    # Finance (and operators) may view the billing models.
    role_permissions_sync(apps)


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0001_initial"),
        ("limits", "0002_staff_roles"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
