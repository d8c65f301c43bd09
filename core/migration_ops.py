"""Migration operations of our own, for what Django's would do at a cost."""

from __future__ import annotations

from django.db import migrations
from django.db.migrations.operations.base import Operation
from django.db.models import Field


def fk_index_dropped(model_name: str, name: str, field: Field, *, table: str, index: str) -> Operation:
    """`AlterField` of a foreign key to `db_index=False` that only drops its index (`index`,
    the name Django gave it, the same on every backend). Django's own drops and re-adds
    the foreign key constraint too, which on PostgreSQL checks every row of the table again
    under a lock that stops its writers; SQLite would copy the whole table."""
    column = f"{name}_id"
    return migrations.SeparateDatabaseAndState(
        database_operations=[migrations.RunSQL(f'DROP INDEX IF EXISTS "{index}"',
                                               f'CREATE INDEX IF NOT EXISTS "{index}" ON "{table}" ("{column}")')],
        state_operations=[migrations.AlterField(model_name=model_name, name=name, field=field)],
    )
