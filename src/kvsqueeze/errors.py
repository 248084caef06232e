"""One exception type for every user-facing mistake; the CLI prints its message as one line."""

from __future__ import annotations

import os
from pathlib import Path


class KVSqueezeError(ValueError):
    """Bad input from the user (spec, ratio, model, file); the message names the fix."""


def os_reason(exc: OSError, path: str | os.PathLike) -> str:
    """Why writing under ``path`` failed, in words for a one-line message. When an existing part of ``path`` is a
    file where a folder is needed, that part is named (the OS says only "File exists" or "Not a directory")."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        for part in (Path(path), *Path(path).parents):
            if part.exists():
                if not part.is_dir():
                    return f"{part} is a file, not a folder"
                break
    return exc.strerror or str(exc)
