"""Tags across machines: bytes and live allocations per machine side by side, tags ranked by how much they
differ, and the machines where a tag is an outlier among its peers.

A machine's peers are the machines running the same kernel build (the whole
fleet when fewer than ``MIN_PEERS`` share it): tags that exist on one build
only would otherwise look like outliers in a mixed fleet.  A machine is an
outlier for a tag when its bytes exceed the peers' median by more than
``OUTLIER_MADS`` median absolute deviations and are at least
``OUTLIER_RATIO`` times that median, so that small wobbles of a tag every
machine uses are not reported as leads.
"""

from __future__ import annotations

import html
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from volplugins.batch import outputs, summary
from volplugins.batch.jobs import INFO_SLUG, POOLTAGS

OUTLIER_MADS = 3
OUTLIER_RATIO = 2
MIN_PEERS = 3
TABLE_TAGS = 20


@dataclass
class Outlier:
    machine: str
    bytes: int
    peer_median: float
    mads: float | None  # deviations above the median; None when the peers do not vary at all


@dataclass
class TagRow:
    tag: str
    pool: str
    bytes: dict[str, int]
    allocations: dict[str, int]
    median_bytes: float
    spread_bytes: int  # largest minus smallest
    outliers: list[Outlier] = field(default_factory=list)

    @property
    def excess(self) -> float:
        return max((outlier.bytes - outlier.peer_median for outlier in self.outliers), default=0)


@dataclass
class Fleet:
    machines: dict[str, str | None]  # machine -> build
    tags: list[TagRow]
    skipped: list[str]  # machines without a tag census

    @property
    def outlier_machines(self) -> list[str]:
        return sorted({outlier.machine for row in self.tags for outlier in row.outliers})

    def as_json(self) -> dict:
        return {
            "machines": [{"machine": name, "build": build} for name, build in self.machines.items()],
            "skipped": self.skipped,
            "rule": {"outlier_mads": OUTLIER_MADS, "outlier_ratio": OUTLIER_RATIO, "min_peers": MIN_PEERS,
                     "peers": "machines of the same build"},
            "outlier_machines": self.outlier_machines,
            "tags": [asdict(row) for row in self.tags],
        }


def load_fleet(out_dir: Path) -> Fleet:
    """Every machine of the output directory with a PoolMon run (``windows.pooltags`` without a baseline)."""
    censuses: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}
    builds: dict[str, str | None] = {}
    skipped: list[str] = []
    for machine in outputs.machines_in(out_dir):
        record = outputs.read_record(out_dir, machine) or {}
        slug = summary.run_slug(record.get("runs", {}), POOLTAGS, None)
        rows = outputs.read_rows(out_dir, machine, slug) if slug else []
        if not rows:
            skipped.append(machine)
            continue
        censuses[machine] = _per_tag(rows)
        info = {row.get("Variable"): row.get("Value") for row in outputs.read_rows(out_dir, machine, INFO_SLUG)}
        builds[machine] = summary.build_of(info)
    keys = sorted(set().union(*censuses.values())) if censuses else []
    rows = [_tag_row(key, censuses, _peers(builds)) for key in keys]
    rows.sort(key=lambda row: (not row.outliers, -row.excess, -row.spread_bytes, row.tag, row.pool))
    return Fleet(builds, rows, skipped)


def _per_tag(rows: list[dict]) -> dict[tuple[str, str], tuple[int, int]]:
    """(tag, pool) -> (live bytes, live allocations); a tag seen with and without the protected bit is one tag."""
    totals: dict[tuple[str, str], tuple[int, int]] = {}
    for row in summary.tag_rows(rows):
        key = (row.get(summary.TAG), row.get(summary.POOL))
        live_bytes, live = totals.get(key, (0, 0))
        totals[key] = (live_bytes + int(row.get(summary.BYTES) or 0), live + int(row.get(summary.LIVE) or 0))
    return totals


def _peers(builds: dict[str, str | None]) -> dict[str, list[str]]:
    fleet = list(builds)
    groups: dict[str | None, list[str]] = {}
    for machine, build in builds.items():
        groups.setdefault(build, []).append(machine)
    return {machine: groups[build] if len(groups[build]) >= MIN_PEERS else fleet
            for machine, build in builds.items()}


def _tag_row(key: tuple[str, str], censuses: dict, peers: dict[str, list[str]]) -> TagRow:
    tag, pool = key
    values = {machine: census.get(key, (0, 0))[0] for machine, census in censuses.items()}
    allocations = {machine: census.get(key, (0, 0))[1] for machine, census in censuses.items()}
    row = TagRow(tag, pool, values, allocations, statistics.median(values.values()),
                 max(values.values()) - min(values.values()))
    for machine, value in values.items():
        outlier = _outlier(machine, value, [values[peer] for peer in peers[machine]])
        if outlier is not None:
            row.outliers.append(outlier)
    return row


def _outlier(machine: str, value: int, peer_values: list[int]) -> Outlier | None:
    median = statistics.median(peer_values)
    mad = statistics.median(abs(peer - median) for peer in peer_values)
    if value <= median + OUTLIER_MADS * mad or value < OUTLIER_RATIO * median or value == 0:
        return None
    return Outlier(machine, value, median, (value - median) / mad if mad else None)


# -- rendering ---------------------------------------------------------------------------------------------------
def table(fleet: Fleet, top: int = TABLE_TAGS) -> str:
    """Per tag: spread, then bytes/allocations for each machine, then the outlier machines."""
    machines = list(fleet.machines)
    header = ["Tag", "Pool", "Spread", *machines, "Outliers"]
    lines = [header]
    for row in fleet.tags[:top]:
        cells = [f"{row.bytes[m]}/{row.allocations[m]}" for m in machines]
        lines.append([row.tag, row.pool, str(row.spread_bytes), *cells,
                      ", ".join(outlier.machine for outlier in row.outliers) or "-"])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.append("cells: live bytes/live allocations; outliers: more than "
                f"{OUTLIER_MADS} MADs above the median of machines of the same build and at least "
                f"{OUTLIER_RATIO}x it")
    if fleet.skipped:
        text.append(f"no tag census: {', '.join(fleet.skipped)}")
    return "\n".join(text) + "\n"


def html_page(fleet: Fleet, top: int | None = None) -> str:
    """A self-contained page: tags x machines, each cell shaded by its share of the tag's largest value,
    outliers outlined; no script, no external resources."""
    machines = list(fleet.machines)
    head = "".join(f"<th class=m>{html.escape(m)}<br><small>{html.escape(fleet.machines[m] or '?')}</small></th>"
                   for m in machines)
    body = []
    for row in fleet.tags[:top]:
        largest = max(row.bytes.values()) or 1
        flagged = {outlier.machine for outlier in row.outliers}
        cells = "".join(
            f"<td class='{'out' if m in flagged else ''}' style='background:rgba(200,30,30,"
            f"{row.bytes[m] / largest:.2f})' title='{html.escape(m)}: {row.bytes[m]} bytes, "
            f"{row.allocations[m]} allocations'>{row.bytes[m]}<br><small>{row.allocations[m]}</small></td>"
            for m in machines)
        body.append(f"<tr><th>{html.escape(row.tag)}</th><td>{html.escape(row.pool)}</td>"
                    f"<td>{row.spread_bytes}</td>{cells}</tr>")
    return _PAGE.format(machines=len(machines), tags=len(fleet.tags), head=head, body="\n".join(body),
                        outliers=html.escape(", ".join(fleet.outlier_machines) or "none"),
                        mads=OUTLIER_MADS, ratio=OUTLIER_RATIO)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Pool tags across the fleet</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f4f4f4; position: sticky; top: 0; }}
tr > th:first-child {{ text-align: left; font-family: monospace; position: sticky; left: 0; }}
td.out {{ outline: 3px solid #000; outline-offset: -3px; font-weight: bold; }}
small {{ color: #555; }}
</style></head><body>
<h1>Pool tags across the fleet</h1>
<p>{machines} machines, {tags} tags. Cells: live bytes, live allocations below; shade: share of the tag's
largest value. Outlined: outliers (more than {mads} median absolute deviations above the median of machines of
the same build, and at least {ratio}x it). Outlier machines: <b>{outliers}</b>.</p>
<table><thead><tr><th>Tag</th><th>Pool</th><th>Spread</th>{head}</tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""
