"""Copies of a bundled kernel ISF with chosen symbols, types or structure members left out.

Real symbol tables are not always whole: a table generated from a stripped or
partial PDB, or trimmed by hand, lacks what nothing public described.  A copy
keeps the original's PDB identity (GUID and age), so Volatility 3 matches it
to the same sample image when it is the only table in its symbol directory.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterable
from pathlib import Path

from .flavors import FLAVORS, SYMBOLS


def write_partial_isf(flavor: str, out_dir: Path, symbols: Iterable[str] = (), types: Iterable[str] = (),
                      members: Iterable[str] = ()) -> Path:
    """Write ``flavor``'s ISF without ``symbols``, ``types`` and ``members`` (``"_TYPE.Member"``) under
    ``out_dir``, laid out as a symbol directory (``windows/ntkrnlmp.pdb/<GUID>-<age>.json``, uncompressed:
    written in a fraction of the time and read the same way).

    Returns ``out_dir``, the directory to give Volatility 3 with ``-s``.  Names the ISF does not have are an
    error, so a test cannot silently remove nothing.
    """
    source = FLAVORS[flavor].isf_path
    with lzma.open(source, "rt") as handle:
        data = json.load(handle)
    for name in symbols:
        del data["symbols"][name]
    for name in types:
        del data["user_types"][name]
    for path in members:
        type_name, member = path.split(".", 1)
        del data["user_types"][type_name]["fields"][member]
    target = out_dir / source.relative_to(SYMBOLS.parent.parent).with_suffix("")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    return out_dir
