"""Persistence: ORM models, engine and migrations, and one-query data-access functions."""
