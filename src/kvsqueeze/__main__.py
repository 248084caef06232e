"""``python -m kvsqueeze``: the same as the ``kvsqueeze`` command."""

from kvsqueeze.console import main

main()
