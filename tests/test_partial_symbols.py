"""A symbol table that lacks a symbol, a type or a member costs only the feature that needs it, with one warning.

Each case runs every plugin on a sample image whose kernel module uses a copy of the build's ISF without one
name.  The pool questions (which chunks, which owner, which tag counts) are answered exactly as with the whole
table, except what the missing name is for: without ``PoolBigPageTable`` there are no big allocations, without
``MiState`` the pool pages are found by page validation.  Volatility 3's own Windows table class insists on
``_OBJECT_HEADER``; that case loads the copy as a plain symbol table.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest
from volatility3.framework import contexts
from volatility3.framework.symbols import intermed
from volatility3.framework.symbols.windows import WindowsKernelIntermedSymbols

from conftest import FLAVORS
from samples.flavors import FLAVORS as FLAVOR_SPECS
from samples.isf import KernelTypes
from samples.partial_isf import write_partial_isf
from test_poolcensus import DEFAULTS
from volplugins.pool.kernel import Kernel

CENSUS = "windows.poolcensus.PoolCensus"
OWNER = "windows.poolowner.PoolOwner"
TAGS = "windows.pooltags.PoolTags"
DRIVERS = "windows.pooldrivers.PoolDrivers"
REMOVALS = [
    ("symbols", "ObTypeIndexTable"),
    ("types", "_OBJECT_TYPE"),
    ("types", "_OBJECT_HEADER"),
    ("symbols", "MiState"),
    ("symbols", "PoolBigPageTable"),
    ("members", "_POOL_HEADER.ProcessBilled"),
    ("members", "_POOL_TRACKER_BIG_PAGES.PoolType"),
]
PROBES = 40


def _module_without(sample, tmp_path, kind: str, name: str) -> str:
    """A kernel module over the sample's kernel layer whose symbol table lacks ``name``; its name."""
    directory = write_partial_isf(sample.flavor, tmp_path, **{kind: [name]})
    (isf,) = directory.rglob("*.json")
    context = sample.session.context
    label = f"partial_{sample.flavor}_{name}".replace(".", "_").replace("-", "_")
    try:
        table = WindowsKernelIntermedSymbols(context, label, name=label, isf_url=isf.as_uri())
    except ValueError:  # Volatility 3's Windows table attaches classes to _OBJECT_HEADER and refuses without it
        table = intermed.IntermediateSymbolTable(context, label, name=label, isf_url=isf.as_uri())
    context.symbol_space.append(table)
    kernel = sample.kernel
    contexts.Module.create(context, label, kernel.layer_name, kernel.base, symbol_table_name=label)
    return label


def _pool_answers(session, kernel_module: str | None, probes: list[int]) -> dict:
    options = {} if kernel_module is None else {"kernel": kernel_module}
    census = [r for r in session.rows(CENSUS, **(DEFAULTS | options)) if r["Address"] is not None]
    owners = session.rows(OWNER, **(options | {"address": [hex(address) for address in probes]}))
    tags = session.rows(TAGS, **options)
    session.rows(DRIVERS, **options)
    session.rows(CENSUS, **(DEFAULTS | options | {"carve": True}))
    return {
        "chunks": Counter((r["Address"], r["Size"], r["Tag"], r["Protected"], r["State"], r["Backing"],
                           r["Pool"] if r["State"] == "Allocated" else None) for r in census),
        "owners": [(r["Address"], r["Chunk"], r["Size"], r["Tag"], r["State"]) for r in owners if r["Owner"] == "*"],
        "tags": sorted((r["Tag"], r["Type"], r["Allocs"], r["Frees"], r["Bytes"]) for r in tags),
    }


@pytest.mark.parametrize("flavor", FLAVORS)
def test_each_missing_name_costs_only_its_feature(samples, tmp_path, caplog, flavor):
    sample = samples[flavor]
    rng = random.Random(5)
    probes = [a["address"] + a["size"] // 2 for a in rng.sample(sample.manifest["allocations"], PROBES)]
    whole = _pool_answers(sample.session, None, probes)
    big = {key for key in whole["chunks"] if key[5] in ("Big", "Large")}
    types = KernelTypes(FLAVOR_SPECS[flavor].isf_path)
    removals = [(kind, name) for kind, name in REMOVALS if _has(types, kind, name)]
    assert len(removals) >= 6  # Windows 7 and 8.1 keep their regions in Mm* variables, not MiState
    for index, (kind, name) in enumerate(removals):
        caplog.clear()
        module = _module_without(sample, tmp_path / str(index), kind, name)
        with caplog.at_level(logging.WARNING):
            partial = _pool_answers(sample.session, module, probes)
        missing = name.rsplit(".", 1)[-1]
        assert any(missing in record.getMessage() for record in caplog.records), (name, caplog.text[-2000:])
        expected = whole["chunks"]
        if name == "PoolBigPageTable":  # the only record of big allocations and of what headerless blocks hold
            expected = Counter({key: count for key, count in expected.items() if key not in big})
            partial["chunks"] = Counter({key: count for key, count in partial["chunks"].items()
                                         if key[0] not in {address for address, *_ in big}})
        if name == "MiState":  # free chunks' pool comes from their region, unknown now
            partial["chunks"] = Counter({key[:6]: count for key, count in partial["chunks"].items()})
            expected = Counter({key[:6]: count for key, count in expected.items()})
        assert partial["chunks"] == expected, name
        assert partial["tags"] == whole["tags"], name
        if name != "PoolBigPageTable":
            assert partial["owners"] == whole["owners"], name


def _has(types: KernelTypes, kind: str, name: str) -> bool:
    if kind == "symbols":
        return types.has_symbol(name)
    if kind == "types":
        return types.has_type(name)
    return types.has_field(*name.split(".", 1))


def test_missing_member_is_not_a_present_field(samples, tmp_path):
    """Volatility raises IndexError for a member a template lacks: the kernel wrapper treats it as absent."""
    sample = samples["win10-1809"]
    module = _module_without(sample, tmp_path, "members", "_POOL_HEADER.ProcessBilled")
    kernel = Kernel.from_module(sample.session.context, module)
    assert not kernel.has_field("_POOL_HEADER", "ProcessBilled")
    assert kernel.has_field("_POOL_HEADER", "PoolTag")
