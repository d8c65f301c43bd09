from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from files_app import services


class Command(BaseCommand):
    help = ("Queue text extraction again for uploads still pending after --older-than-minutes "
            "(a lost task or a worker killed mid-run). Safe to run from cron.")

    def add_arguments(self, parser):
        parser.add_argument("--older-than-minutes", type=float, default=10.0)

    def handle(self, *args, older_than_minutes: float, **options):
        if older_than_minutes < 0:
            raise CommandError("--older-than-minutes must be >= 0")
        count = services.requeue_stale_pending(older_than=timedelta(minutes=older_than_minutes))
        self.stdout.write(f"Queued extraction of {count} pending file(s).")
