from django.core.management.base import BaseCommand

from billing_app import services


class Command(BaseCommand):
    help = "Release credit holds that expired (streams whose process died before settling)."

    def handle(self, *args, **options):
        count = services.release_expired_holds()
        self.stdout.write(f"Released {count} expired hold(s).")
