"""The archived messages: one row per message, its tree link and all it carried.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A message id is Redis's stream id <ms>-<seq>, kept as its two numbers
    # so ids sort as Redis sorts them. The primary key is the only index a
    # history page needs: a page walks parent links, and each step is one
    # lookup of (thread_id, ms, seq). parent_ms/parent_seq are NULL for a root.
    op.execute(
        """
        CREATE TABLE archived_messages (
            thread_id     text     NOT NULL,
            ms            bigint   NOT NULL,
            seq           bigint   NOT NULL,
            parent_ms     bigint,
            parent_seq    bigint,
            role          text     NOT NULL,
            content       text     NOT NULL,
            user_id       text     NOT NULL,
            created_at    bigint   NOT NULL,
            status        text     NOT NULL,
            client_msg_id text,
            queue_id      text,
            usage         jsonb,
            tool_calls    jsonb,
            archived_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (thread_id, ms, seq),
            CHECK ((parent_ms IS NULL) = (parent_seq IS NULL))
        )
        """
    )
    # Erasing a user's data finds their messages without reading every thread.
    op.execute("CREATE INDEX archived_messages_user ON archived_messages (user_id)")


def downgrade() -> None:
    op.execute("DROP TABLE archived_messages")
