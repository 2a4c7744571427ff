"""A build no flavor models: a flavor's kernel under another build number and PDB identity, optionally with
members no modeled build has.

Windows keeps most kernel structures from one build to the next and adds or moves a few members.  A build we
have never seen is modeled from a flavor: its kernel reports another build number and carries another PDB GUID
(so no table keyed on either can recognise it), and its ISF, written next to the image, can declare extra
members of the kind Windows adds: a field appended to the big page and tag tracker entries, and one inserted
before ``SegContexts`` in ``_SEGMENT_HEAP`` (as Server 2022 inserted ``ReservedRegionEnd``).  Facts no ISF
holds can change too, such as the constants the segment heap mixes into its signatures (build 26100 changed
two).  The pools, objects and manifest are those of the flavor; only the structures' bytes move.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import replace
from pathlib import Path

from .flavors import Flavor

# (type, member the new one goes before, or None to append, size in bytes)
EXTRA_MEMBERS = (
    ("_POOL_TRACKER_BIG_PAGES", None, 8),
    ("_POOL_TRACKER_TABLE", None, 8),
    ("_SEGMENT_HEAP", "SegContexts", 0x40),
)
EXTRA_MEMBER_NAME = "UnknownToAnyFlavor"


def unseen_flavor(flavor: Flavor, build: int, isf_root: Path, extra_members: bool = False, **facts) -> Flavor:
    """``flavor`` as build ``build``: a new ISF under ``isf_root`` (a symbol directory for ``vol -s``).

    ``facts`` replace flavor facts no ISF holds, such as the segment heap's key constants."""
    with lzma.open(flavor.isf_path, "rt") as handle:
        isf = json.load(handle)
    identity = f"{flavor.isf_file}:{build}:{extra_members}:{sorted(facts.items())}".encode()
    guid = hashlib.md5(identity).hexdigest().upper()
    pdb = isf["metadata"]["windows"]["pdb"]
    pdb["GUID"] = guid
    if extra_members:
        for type_name, before, size in EXTRA_MEMBERS:
            if type_name in isf["user_types"]:
                _add_member(isf["user_types"][type_name], before, size)
    directory = Path(isf_root) / "windows" / pdb["database"]
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{guid}-{pdb['age']}.json.xz"
    with lzma.open(directory / name, "wt") as handle:
        json.dump(isf, handle)
    return replace(flavor, build=build, isf_file=name, isf_dir=directory, **facts)


def _add_member(structure: dict, before: str | None, size: int) -> None:
    """Insert a byte-array member before ``before`` (or at the end), moving later members and the size."""
    at = structure["fields"][before]["offset"] if before else structure["size"]
    for member in structure["fields"].values():
        if member["offset"] >= at:
            member["offset"] += size
    structure["fields"][EXTRA_MEMBER_NAME] = {
        "offset": at,
        "type": {"kind": "array", "count": size, "subtype": {"kind": "base", "name": "unsigned char"}},
    }
    structure["size"] += size
