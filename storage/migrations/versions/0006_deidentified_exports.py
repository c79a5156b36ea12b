"""de-identified exports: each study's pseudonymous identity per destination and its replaced UIDs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 13:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deid_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("original_study_uid", sa.String(length=64), nullable=False),
        sa.Column("deidentified_study_uid", sa.String(length=64), nullable=False, unique=True),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("day_offset", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ux_deid_studies_destination_study", "deid_studies", ["destination", "original_study_uid"], unique=True
    )
    op.create_table(
        "deid_uids",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("deid_study_fk", sa.Integer(), sa.ForeignKey("deid_studies.id"), nullable=False),
        sa.Column("original_uid", sa.String(length=64), nullable=False),
        sa.Column("deidentified_uid", sa.String(length=64), nullable=False, unique=True),
    )
    op.create_index("ix_deid_uids_deid_study_fk", "deid_uids", ["deid_study_fk"])
    op.create_index("ux_deid_uids_study_original", "deid_uids", ["deid_study_fk", "original_uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_deid_uids_study_original", table_name="deid_uids")
    op.drop_index("ix_deid_uids_deid_study_fk", table_name="deid_uids")
    op.drop_table("deid_uids")
    op.drop_index("ux_deid_studies_destination_study", table_name="deid_studies")
    op.drop_table("deid_studies")
