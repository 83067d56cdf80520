"""``python -m sae``: the same as the ``sae`` command."""

from .cli import main

main()
