from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from files_app import services
from files_app.tasks import schedule_requeue


class Command(BaseCommand):
    help = ("Queue text extraction again for uploads still pending after --older-than SECONDS "
            "(a task lost after the commit, a worker killed mid-run). With --every SECONDS, also "
            "queue a task that the db_worker repeats that often.")

    def add_arguments(self, parser):
        parser.add_argument("--older-than", type=int, default=600, metavar="SECONDS",
                            help="Only files pending at least this long (default 600).")
        parser.add_argument("--every", type=int, default=0, metavar="SECONDS",
                            help="Keep doing this from the db_worker at this interval.")

    def handle(self, *args, older_than: int, every: int, **options):
        if older_than < 0:
            raise CommandError("--older-than must be >= 0")
        count = services.requeue_stale_pending(older_than=timedelta(seconds=older_than))
        self.stdout.write(f"Queued extraction of {count} pending file(s).")
        if every > 0:
            queued = schedule_requeue(every, older_than_seconds=older_than, delay=every)
            self.stdout.write("Periodic requeue queued." if queued else "A periodic requeue is already queued.")
