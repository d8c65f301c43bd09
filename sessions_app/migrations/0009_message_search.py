"""The full-text search indexes of GET /api/v1/search (SPEC section 17; sessions_app/search.py).

PostgreSQL only: GIN indexes on the expressions the search filters on,
`to_tsvector('english'::regconfig, COALESCE(<column>, ''))` of a message's content and of
a session's title (what `SearchVector(<column>, config="english")` compiles to; the test
suite asserts the planner uses them). Expression indexes, maintained by the database on
every write, with no column or model field to keep in step: the model state does not
change, so `makemigrations --check` has nothing to say, and SQLite (substring search, no
index) gets nothing.

Outside a transaction (a plain `migrate`) the indexes are built CONCURRENTLY, so a large
messages table keeps taking writes meanwhile; an invalid index a failed concurrent build
left behind is dropped and built again. Inside one (a test's), a plain CREATE INDEX.
"""

from django.db import migrations

# (index name, model, column): the expression is to_tsvector('english', COALESCE(column, '')).
INDEXES = [
    ("message_content_search_idx", "message", "content"),
    ("session_title_search_idx", "chatsession", "title"),
]


def _concurrently(schema_editor) -> str:
    return "" if schema_editor.connection.in_atomic_block else " CONCURRENTLY"


def create_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    quote = schema_editor.quote_name
    concurrently = _concurrently(schema_editor)
    for name, model, column in INDEXES:
        table = apps.get_model("sessions_app", model)._meta.db_table
        with schema_editor.connection.cursor() as cursor:
            cursor.execute("SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                           "WHERE c.relname = %s AND pg_catalog.pg_table_is_visible(c.oid)", [name])
            row = cursor.fetchone()
        if row is not None and row[0]:
            schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS {quote(name)}")
        schema_editor.execute(
            f"CREATE INDEX{concurrently} IF NOT EXISTS {quote(name)} ON {quote(table)} "
            f"USING gin (to_tsvector('english'::regconfig, COALESCE({quote(column)}, '')))"
        )


def drop_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    concurrently = _concurrently(schema_editor)
    for name, _model, _column in INDEXES:
        schema_editor.execute(f"DROP INDEX{concurrently} IF EXISTS {schema_editor.quote_name(name)}")


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run in a transaction.
    atomic = False

    dependencies = [
        ("sessions_app", "0008_message_tree"),
    ]

    operations = [
        migrations.RunPython(create_indexes, drop_indexes),
    ]
