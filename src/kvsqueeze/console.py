"""Entry point of the ``kvsqueeze`` console script: one line naming the extra when the CLI's packages are missing."""

from __future__ import annotations

import sys

CLI_HINT = "kvsqueeze: the command line needs the 'cli' extra: pip install 'kvsqueeze[cli]'"


def main() -> None:
    try:
        import rich  # noqa: F401
        import typer  # noqa: F401
    except ImportError:
        print(CLI_HINT, file=sys.stderr)
        sys.exit(2)
    from kvsqueeze.cli import main as cli_main

    cli_main()
