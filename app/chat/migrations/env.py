"""Alembic's environment for the archive: run online, on the connection
app.chat.archive.migrate opens (the URL never goes through a config file or
a log line)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

url = context.config.attributes["url"]
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
