"""One fuzz campaign: per flavor, build an image, run every plugin on each mutant, check the answers.

Checks, per mutant: no plugin raises, none runs past the time bound, and
every manifest allocation outside the mutation's reach is listed by the
census exactly (address, size, tag, state, backing, pool, region), with no
listed chunk outside the reach that the manifest does not have.  Owner
lookups of addresses inside untouched allocations must name them exactly.
Random addresses of every kind go through the owner lookup on the undamaged
image (pool addresses checked against the manifest) and, a few per mutant,
on the damaged ones.
"""

from __future__ import annotations

import logging
import random
import resource
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from samples.build import build_image
from volplugins.pool import tags

from .image import Pristine
from .mutants import Mutation, mutations
from .session import Hang, Session, time_bound

CENSUS = "windows.poolcensus.PoolCensus"
OWNER = "windows.poolowner.PoolOwner"
TAGS = "windows.pooltags.PoolTags"
DRIVERS = "windows.pooldrivers.PoolDrivers"
CENSUS_DEFAULTS = {"tag": [], "free": False, "allocated": False, "min-size": None, "max-size": None, "big": False,
                   "region": None, "bigpages": False, "free-analysis": False, "carve": False, "validate": False,
                   "coverage": False, "dump": False}
CENSUS_VIEWS = ("validate", "coverage", "bigpages", "free-analysis", "carve")
TAGS_DEFAULTS = {"scan": True, "sort": "bytes", "tag": [], "exclude": [], "pool": [], "top": None, "unknown": False,
                 "baseline": None, "driver-scan": False}
OWNER_DEFAULTS = {"contents": False, "driver-scan": "never", "address-file": None}
TOP = 1  # tree level of a grid's top rows
ADDRESS_BATCH = 500
PROGRESS_EVERY = 50
PROBES_PER_MUTANT = 12
KEY_FIELDS = ("address", "size", "tag", "state", "backing", "pool", "region")
ROW_FIELDS = ("Address", "Size", "Tag", "State", "Backing", "Pool", "Region")


@dataclass
class Failure:
    flavor: str
    what: str  # traceback, hang, lost, phantom, owner
    mutation: str
    detail: str


@dataclass
class Report:
    mutants: Counter = field(default_factory=Counter)  # (flavor, kind) -> count
    runs: int = 0
    addresses: int = 0
    checked_allocations: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0

    def failed(self, what: str) -> int:
        return sum(1 for failure in self.failures if failure.what == what)


def _key(allocation: dict) -> tuple:
    return tuple(allocation[name] for name in KEY_FIELDS)


def _row_key(row: dict) -> tuple:
    return tuple(_stored_tag(row) if name == "Tag" else row[name] for name in ROW_FIELDS)


def _stored_tag(row: dict) -> str:
    """A row's tag as the manifest writes it: plugins show tags without the protected bit and say it apart."""
    raw = tags.tag_from_text(row["Tag"])
    return tags.tag_text(raw[:-1] + bytes([raw[-1] | tags.PROTECTED_TAG_BIT]) if row.get("Protected") else raw)


def _touched(allocation: dict, mutation: Mutation) -> bool:
    start, end = allocation["address"], allocation["address"] + max(allocation["size"], 1)
    if mutation.big_table and allocation["backing"] in ("Big", "Large"):
        return True
    return any(start < high and low < end for low, high in mutation.reach)


def _in_reach(address: int, mutation: Mutation) -> bool:
    return any(low <= address < high for low, high in mutation.reach)


class Campaign:
    """Mutants and addresses for one flavor's image."""

    def __init__(self, pristine: Pristine, session: Session, report: Report, seed: int, bound: float):
        self.pristine = pristine
        self.session = session
        self.report = report
        self.seed = seed
        self.bound = bound
        self.flavor = pristine.flavor.name
        self.keys = {_key(a) for a in pristine.allocations}

    # -- running ---------------------------------------------------------------------------------------------
    def _run(self, plugin: str, options: dict, mutation: str) -> list[dict] | None:
        self.report.runs += 1
        try:
            with time_bound(self.bound):
                return self.session.rows(plugin, **options)
        except Hang as hang:
            self._fail("hang", mutation, f"{plugin} {options}: {hang}")
        except (Exception, SystemExit):  # noqa: BLE001 - anything escaping a plugin is the finding
            self._fail("traceback", mutation, f"{plugin} {options}:\n{traceback.format_exc(limit=-6)}")
        return None

    def _fail(self, what: str, mutation: str, detail: str) -> None:
        self.report.failures.append(Failure(self.flavor, what, mutation, detail))

    # -- mutants ---------------------------------------------------------------------------------------------
    def mutants(self, count: int, progress: Callable[[str], None] | None = None) -> None:
        for index, mutation in enumerate(mutations(self.pristine, self.seed, count)):
            self.check(mutation, index)
            if progress is not None and (index + 1) % PROGRESS_EVERY == 0:
                progress(f"{self.flavor}: {index + 1} of {count} mutants, {len(self.report.failures)} failures")

    def check(self, mutation: Mutation, index: int) -> None:
        """Run every plugin on the image with ``mutation`` applied and check the answers."""
        self.report.mutants[(self.flavor, mutation.kind)] += 1
        self.session.load(_damaged(self.pristine.raw, mutation))
        try:
            self._check_mutant(mutation, index)
        finally:
            self.session.load(self.pristine.raw)

    def _check_mutant(self, mutation: Mutation, index: int) -> None:
        label = f"{mutation.kind}: {mutation.note}"
        listed = self._run(CENSUS, CENSUS_DEFAULTS, label)
        view = CENSUS_VIEWS[index % len(CENSUS_VIEWS)]
        self._run(CENSUS, CENSUS_DEFAULTS | {view: True}, label)
        self._run(TAGS, TAGS_DEFAULTS, label)
        self._run(DRIVERS, {"tag": [], "call-sites": False, "include-kernel": False}, label)
        rng = random.Random(f"{self.seed}:{self.flavor}:probes:{index}")
        untouched = [a for a in self.pristine.allocations if not _touched(a, mutation)]
        # Damage that may reach every answer (bookkeeping cut off) leaves no allocation whose owner is certain.
        owned = 0 if mutation.everything else min(PROBES_PER_MUTANT // 2, len(untouched))
        probes = rng.sample(untouched, owned)
        self._owner(probes, self._addresses(rng, PROBES_PER_MUTANT // 2), label)
        if listed is None or mutation.everything:
            return
        self.report.checked_allocations += len(untouched)
        rows = {_row_key(row) for row in listed if row["_depth"] == TOP and row.get("Address") is not None}
        lost = [a for a in untouched if _key(a) not in rows]
        if lost:
            self._fail("lost", label, f"{len(lost)} untouched allocations not listed exactly, e.g. {lost[:3]}")
        if not mutation.big_table:
            phantom = [row for row in rows if row not in self.keys and not _in_reach(row[0], mutation)]
            if phantom:
                self._fail("phantom", label, f"{len(phantom)} chunks outside the damage not in the manifest,"
                                             f" e.g. {phantom[:3]}")

    # -- addresses ---------------------------------------------------------------------------------------------
    def addresses(self, count: int) -> None:
        """``count`` random addresses on the undamaged image, a quarter of them inside allocations."""
        rng = random.Random(f"{self.seed}:{self.flavor}:addresses")
        done = 0
        while done < count:
            batch = min(ADDRESS_BATCH, count - done)
            owned = rng.sample(self.pristine.allocations, min(batch // 4, len(self.pristine.allocations)))
            self._owner(owned, self._addresses(rng, batch - len(owned)), "undamaged image")
            done += batch

    def _addresses(self, rng: random.Random, count: int) -> list[int]:
        """Kernel image, other kernel regions, pool, user, unmapped and non-canonical addresses."""
        manifest = self.pristine.manifest
        regions = manifest["regions"]
        out = []
        for _ in range(count):
            kind = rng.randrange(6)
            if kind == 0:
                out.append(manifest["kernel_base"] + rng.randrange(0x100_0000))
            elif kind == 1:
                region = rng.choice(regions)
                out.append(region["start"] + rng.randrange(max(1, region["end"] - region["start"])))
            elif kind == 2:
                page = rng.choice(sorted(self.pristine.data_pages))
                out.append(page + rng.randrange(0x1000))
            elif kind == 3:
                out.append(rng.randrange(0x7FFF_FFFF_0000))
            elif kind == 4:
                out.append(0xFFFF_8000_0000_0000 + rng.randrange(1 << 47))
            else:
                out.append(rng.randrange(0x0000_8000_0000_0000, 0xFFFF_8000_0000_0000))
        return out

    def _owner(self, owned: list[dict], others: list[int], label: str) -> None:
        """Look every address up in one run; each address inside ``owned`` allocations must be named exactly."""
        probes = {a["address"] + random.Random(a["address"]).randrange(max(a["size"], 1)): a for a in owned}
        addresses = list(probes) + others
        self.report.addresses += len(addresses)
        rows = self._run(OWNER, OWNER_DEFAULTS | {"address": [f"{a:#x}" for a in addresses]}, label)
        if rows is None:
            return
        unanswered = set(addresses) - {row["Address"] for row in rows}
        if unanswered:
            self._fail("owner", label, f"{len(unanswered)} of {len(addresses)} addresses got no answer")
            return
        starred = {row["Address"]: (row["Chunk"], row["Size"], _stored_tag(row), row["State"])
                   for row in rows if row["Owner"] == "*"}
        for address, allocation in probes.items():
            want = (allocation["address"], allocation["size"], allocation["tag"], allocation["state"])
            if starred.get(address) != want:
                self._fail("owner", label, f"{address:#x}: named {starred.get(address)}, manifest {want}")


def _damaged(raw: bytes, mutation: Mutation) -> bytearray | bytes:
    if mutation.truncate is not None:
        return raw[: mutation.truncate]
    data = bytearray(raw)
    for where, patch in mutation.patches:
        data[where : where + len(patch)] = patch
    return data


def run(flavors: list[str], mutants: int, addresses: int, seed: int = 1, size: int = 32 << 20,
        chunks: int = 1500, bound: float = 60.0, work: Path | None = None,
        progress: Callable[[str], None] | None = None) -> Report:
    """A whole campaign; images and Volatility's cache go under ``work`` (a temporary directory by default);
    ``progress`` is told how far each flavor's mutants got."""
    report = Report()
    started = time.perf_counter()
    quiet = [logging.getLogger(name) for name in ("volatility3", "volplugins")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="poolfuzz-") as temporary:
        root = work or Path(temporary)
        try:
            for flavor in flavors:
                built = build_image(flavor, seed=seed, size=size, out_dir=root / "images", chunks=chunks)
                cache = root / f"cache-{flavor}"
                cache.mkdir(parents=True, exist_ok=True)
                pristine = Pristine(built.image_path, built.manifest_path)
                campaign = Campaign(pristine, Session(built.image_path, cache), report, seed, bound)
                campaign.addresses(addresses)
                campaign.mutants(mutants, progress)
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report
