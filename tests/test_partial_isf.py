"""Partial copies of a bundled ISF lack exactly what was asked and keep the kernel's identity."""

from __future__ import annotations

import pytest

from samples.flavors import FLAVORS
from samples.isf import KernelTypes
from samples.partial_isf import write_partial_isf


def test_partial_copy_lacks_only_what_was_removed(tmp_path):
    original = KernelTypes(FLAVORS["win10-1809"].isf_path)
    directory = write_partial_isf("win10-1809", tmp_path, symbols=["MiState"], types=["_OBJECT_TYPE"],
                                  members=["_POOL_TRACKER_BIG_PAGES.PoolType"])
    (written,) = directory.rglob("*.json")
    assert written.name == FLAVORS["win10-1809"].isf_path.name.removesuffix(".xz")
    partial = KernelTypes(written)
    assert partial.pdb == original.pdb
    assert original.has_symbol("MiState") and not partial.has_symbol("MiState")
    assert original.has_type("_OBJECT_TYPE") and not partial.has_type("_OBJECT_TYPE")
    assert not partial.has_field("_POOL_TRACKER_BIG_PAGES", "PoolType")
    assert partial.field("_POOL_TRACKER_BIG_PAGES", "NumberOfBytes") == original.field("_POOL_TRACKER_BIG_PAGES",
                                                                                      "NumberOfBytes")
    assert partial.symbol("PoolBigPageTable") == original.symbol("PoolBigPageTable")


def test_removing_what_is_not_there_is_an_error(tmp_path):
    with pytest.raises(KeyError):
        write_partial_isf("win7-sp1", tmp_path, members=["_POOL_HEADER.NoSuchMember"])
