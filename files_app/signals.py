"""The stored bytes of an uploaded file go when its row goes: API delete, admin delete, or a
user deleted with all their files. Removed only after the deletion is committed."""

import logging

from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver

from files_app.models import UploadedFile

logger = logging.getLogger(__name__)


def _remove_stored(storage, name: str) -> None:
    try:
        storage.delete(name)
    except OSError:
        logger.exception("could not remove stored upload %s", name)


@receiver(post_delete, sender=UploadedFile, dispatch_uid="files_app.remove_stored_bytes")
def remove_stored_bytes(sender, instance: UploadedFile, using: str, **kwargs) -> None:
    if instance.stored and instance.stored.name:
        storage, name = instance.stored.storage, instance.stored.name
        transaction.on_commit(lambda: _remove_stored(storage, name), using=using)
