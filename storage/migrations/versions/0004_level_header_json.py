"""each level keeps its first instance's header as DICOM JSON (C-FIND return keys without a column)

Adds ``dicom_json`` to patients, studies, series and instances. Rows indexed
before this revision are not backfilled and keep NULL: the stored files live
under the storage root, which the migration does not know, and reading every
stored file again is not cheap on a large archive. C-FIND answers the return
keys that need ``dicom_json`` with an empty value for those rows, as before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TABLES = ("patients", "studies", "series", "instances")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("dicom_json", sa.JSON(), nullable=True))


def downgrade() -> None:
    for table in reversed(_TABLES):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("dicom_json")
