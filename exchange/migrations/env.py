"""Alembic environment for the exchange database.

Run time: ``exchange.store.db.upgrade()`` builds the Alembic Config in code and
hands over an open connection in ``config.attributes["connection"]``; the
migrations then run inside the caller's transaction.

Development: from the repository root, with the repo's ``alembic.ini``,
``alembic revision --autogenerate -m "..."`` compares ``exchange.store.schema``
with the database named by ``EXCHANGE_DATABASE_URL`` (else ``sqlalchemy.url``
in alembic.ini). Hand-check every generated revision on both backends.
"""
from __future__ import annotations

import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection

from exchange.store.db import make_engine
from exchange.store.schema import UTCDateTime, metadata

config = context.config
if config.config_file_name is not None:  # the developers' alembic.ini
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = metadata


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Revisions must not import the models (they change, revisions must not):
    # UTCDateTime is a Python-side conversion over a plain tz-aware DateTime.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    dialect_name = kwargs.pop("dialect_name")
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: autogenerate emits batch operations
        # (copy the table, move the rows, swap) there.
        render_as_batch=dialect_name == "sqlite",
        compare_type=True,
        render_item=render_item,
        **kwargs,
    )


def _url() -> str:
    url = os.environ.get("EXCHANGE_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database: set EXCHANGE_DATABASE_URL or sqlalchemy.url in alembic.ini")
    return url


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    url = _url()
    _configure(
        url=url,
        dialect_name=url.split(":", 1)[0].split("+", 1)[0],
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection) -> None:
    _configure(connection=connection, dialect_name=connection.dialect.name)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
