from django.core.management.base import BaseCommand

from sessions_app.turns import sweep_lapsed_turns


class Command(BaseCommand):
    help = ("Close running turns whose lease lapsed (their process died) as 'interrupted', billed "
            "from their last checkpoint, and release holds left without a turn. Idempotent; safe "
            "beside other sweeps. The db_worker runs it every PANTHEON_TURN_LEASE_SECONDS.")

    def handle(self, *args, **options):
        report = sweep_lapsed_turns()
        self.stdout.write(f"Closed {report.interrupted} interrupted turn(s); "
                          f"released {report.holds_released} hold(s) without a turn.")
