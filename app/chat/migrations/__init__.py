"""The archive's schema in PostgreSQL, as Alembic migrations (``durable-chat migrate``)."""
