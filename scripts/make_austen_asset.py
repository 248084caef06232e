"""Build ``src/kvsqueeze/assets/janeausten.json.xz``: Jane Austen's six novels (public domain), one JSON object
``{novel: text}`` (text = the package's lines joined by newlines), xz-compressed. Run once; the result is committed.

Source: Debian package ``r-cran-janeaustenr`` (``data/Rdata.rdb``: an R lazy-load database of character vectors,
one element per line), read with PyPI ``rdata`` (no R needed)::

    python scripts/make_austen_asset.py                 # apt-get download + dpkg-deb -x (Debian/Ubuntu)
    python scripts/make_austen_asset.py PATH.deb        # an already downloaded .deb

Needs ``rdata`` (in the ``dev`` extra). The output is deterministic: same package, same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
OUT = Path(__file__).resolve().parents[1] / "src" / "kvsqueeze" / "assets" / "janeausten.json.xz"


def read_rdb(data_dir: Path) -> dict[str, list[str]]:
    """Every variable of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` zlib chunks)."""
    import rdata

    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns "assumed RDS" for headerless serializations
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
        )
        for name, (offset, length) in index["variables"].items():
            chunk = blob[int(offset) : int(offset) + int(length)]
            (size,) = struct.unpack(">I", chunk[:4])
            body = zlib.decompress(chunk[4:])
            if len(body) != size:
                raise SystemExit(f"corrupt database entry {name}")
            out[str(name)] = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(body))]
    return out


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            deb = Path(argv[0]).resolve()
        else:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        novels = read_rdb(next(Path(tmp, "x").rglob("janeaustenr/data")))
    missing = [n for n in NOVELS if n not in novels]
    if missing:
        raise SystemExit(f"{deb.name} lacks {missing}")
    payload = json.dumps({n: "\n".join(novels[n]) for n in NOVELS}, ensure_ascii=False, sort_keys=True).encode()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    print(f"{OUT}: {OUT.stat().st_size} bytes; text sha256 {hashlib.sha256(payload).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1:])
