from django.core.management.base import BaseCommand

from billing_app import services
from billing_app.tasks import schedule_sweep


class Command(BaseCommand):
    help = ("Release credit holds that expired (streams whose process died before settling). "
            "With --every SECONDS, also queue a sweep that the db_worker repeats that often.")

    def add_arguments(self, parser):
        parser.add_argument("--every", type=int, default=0, metavar="SECONDS",
                            help="Keep sweeping from the db_worker at this interval.")

    def handle(self, *args, every: int, **options):
        count = services.release_expired_holds()
        self.stdout.write(f"Released {count} expired hold(s).")
        if every > 0:
            queued = schedule_sweep(every, delay=every)
            self.stdout.write("Periodic sweep queued." if queued else "A periodic sweep is already queued.")
