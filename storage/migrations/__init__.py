"""Alembic migrations of the index schema (run by :func:`pacsnode.storage.db.migrate`)."""
