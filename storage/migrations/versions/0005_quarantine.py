"""the quarantine: instances kept apart because they contradicted the index (``storage.patient_mismatch``)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("file_path", sa.String(length=255), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
    )
    op.create_index("ix_quarantine_sop_instance_uid", "quarantine", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_quarantine_sop_instance_uid", table_name="quarantine")
    op.drop_table("quarantine")
