"""The README's table of Windows builds names exactly the flavors the suite runs on, with the allocator the
library decides from each image's ISF."""

from __future__ import annotations

from pathlib import Path

from conftest import FLAVORS
from samples.flavors import FLAVORS as FLAVOR_SPECS

README = Path(__file__).resolve().parent.parent / "README.md"


def table_rows() -> dict[str, list[str]]:
    """Flavor -> cells of its row in the builds table."""
    text = README.read_text()
    table = text.split("<!-- builds table")[1].split("<!-- end of builds table")[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()[3:] if line.startswith("|")]
    return {cells[1].strip("`"): cells for cells in rows}


def test_one_row_per_flavor_with_its_build_number():
    rows = table_rows()
    assert sorted(rows) == sorted(FLAVORS)
    for name, cells in rows.items():
        assert cells[0].endswith(f"({FLAVOR_SPECS[name].build})")
        assert len(cells) == 7 and all(cells)


def test_allocator_is_what_the_library_reads_from_the_isf(sample):
    allocator = table_rows()[sample.flavor][2]
    assert allocator == ("segment heap" if sample.kernel.uses_segment_heap else "classic")
