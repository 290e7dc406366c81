"""``python -m app`` is the ``durable-chat`` command."""

from app.cli import main

main()
