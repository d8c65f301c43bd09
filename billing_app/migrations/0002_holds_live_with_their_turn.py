from django.db import migrations
from django.db.models.functions import Now


def release_expired(apps, schema_editor):
    # Holds stop having a clock of their own: release the ones that had already run out,
    # so they do not start counting again. The sweep releases any other hold left without
    # a running turn.
    CreditHold = apps.get_model("billing_app", "CreditHold")
    CreditHold.objects.filter(released_at__isnull=True, expires_at__lte=Now()).update(released_at=Now())


class Migration(migrations.Migration):
    dependencies = [("billing_app", "0001_initial")]

    operations = [
        migrations.RunPython(release_expired, migrations.RunPython.noop),
        migrations.RemoveField(model_name="credithold", name="expires_at"),
    ]
