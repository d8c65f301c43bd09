from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from accounts.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for USERNAME and print it (the key is the last line of output)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="Create the user if it does not exist.")
        parser.add_argument("--name", default="", help="A label for the key.")

    def handle(self, *args, username: str, create_user: bool, name: str, **options):
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            if not create_user:
                raise CommandError(f"No user named {username!r} (use --create-user to create one).")
            user = User.objects.create_user(username=username)
            self.stderr.write(f"Created user {username!r} (no password; set one with changepassword).")
        _, raw = ApiKey.issue(user=user, name=name)
        self.stdout.write(raw)
