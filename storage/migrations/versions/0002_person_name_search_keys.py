"""person name search keys for case-insensitive C-FIND matching

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from pacsnode.storage.query import pn_search_key

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _backfill(table: str, source: str, target: str) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text(f"SELECT id, {source} FROM {table} WHERE {source} IS NOT NULL")).all()
    for row_id, value in rows:
        conn.execute(
            sa.text(f"UPDATE {table} SET {target} = :key WHERE id = :id"),
            {"key": pn_search_key(value), "id": row_id},
        )


def upgrade() -> None:
    with op.batch_alter_table("patients") as batch_op:
        batch_op.add_column(sa.Column("patient_name_key", sa.String(length=324), nullable=True))
        batch_op.create_index("ix_patients_patient_name_key", ["patient_name_key"], unique=False)
    with op.batch_alter_table("studies") as batch_op:
        batch_op.add_column(sa.Column("referring_physician_name_key", sa.String(length=324), nullable=True))
    _backfill("patients", "patient_name", "patient_name_key")
    _backfill("studies", "referring_physician_name", "referring_physician_name_key")


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch_op:
        batch_op.drop_column("referring_physician_name_key")
    with op.batch_alter_table("patients") as batch_op:
        batch_op.drop_index("ix_patients_patient_name_key")
        batch_op.drop_column("patient_name_key")
