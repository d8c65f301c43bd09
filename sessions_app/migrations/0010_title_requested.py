from django.db import migrations, models


def mark_asked(apps, schema_editor):
    """A session that has a title, or whose title turn already ran, is not asked again."""
    ChatSession = apps.get_model("sessions_app", "ChatSession")
    Turn = apps.get_model("sessions_app", "Turn")
    asked = Turn.objects.filter(kind="title").values("session_id")
    ChatSession.objects.exclude(title="").update(title_requested=True)
    ChatSession.objects.filter(pk__in=asked).update(title_requested=True)


class Migration(migrations.Migration):
    dependencies = [("sessions_app", "0009_message_search")]

    operations = [
        migrations.AddField(model_name="chatsession", name="title_requested",
                            field=models.BooleanField(default=False, editable=False)),
        migrations.RunPython(mark_asked, migrations.RunPython.noop),
    ]
