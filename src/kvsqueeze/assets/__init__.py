"""Data shipped inside the package (read with :mod:`importlib.resources`; nothing is downloaded at run time).

- ``janeausten.json.xz`` — Jane Austen's six novels (public domain), ``{novel: text}``, built once from Debian
  ``r-cran-janeaustenr`` by ``scripts/make_austen_asset.py``. Used by the ``ppl`` benchmark task.
"""

from __future__ import annotations

import json
import lzma
from functools import lru_cache
from importlib.resources import files

from kvsqueeze.errors import KVSqueezeError

AUSTEN_ASSET = "janeausten.json.xz"


@lru_cache(maxsize=1)
def austen_novels() -> dict[str, str]:
    """``{novel: text}`` for the six novels (``emma``, ``prideprejudice`` …)."""
    resource = files(__name__) / AUSTEN_ASSET
    try:
        data = json.loads(lzma.decompress(resource.read_bytes()).decode("utf-8"))
    except FileNotFoundError:
        raise KVSqueezeError(f"{AUSTEN_ASSET} is missing from the installed package; reinstall kvsqueeze") from None
    except (lzma.LZMAError, UnicodeDecodeError, ValueError):
        raise KVSqueezeError(f"{AUSTEN_ASSET} in the installed package is corrupt; reinstall kvsqueeze") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise KVSqueezeError(f"{AUSTEN_ASSET} in the installed package is corrupt; reinstall kvsqueeze")
    return data
