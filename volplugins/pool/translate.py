"""Virtual-to-physical translation of whole kernel ranges, read from the page tables in bulk.

Volatility 3 translates one page at a time in Python (a dozen calls per 4 KiB page), which costs more
than reading and decoding the pool itself.  This module answers the same question for a whole range at
once: it starts from what Volatility's layer stack already chose (the kernel layer's DTB and the layer
under it, which may itself be a crash dump, LiME or other segmented layer), reads each page-table page
once through that lower layer and decodes its 512 entries with numpy.

It mirrors exactly what Volatility's ``WindowsIntel32e`` layer does, quirks included, so that results
never depend on which path ran:

* an entry counts as present when its Valid bit is set, or when it is a transition entry (bit 11) that
  is not a prototype entry (bit 10): Windows keeps such pages' frames, and Volatility reads them;
  prototype and pagefile entries are refused;
* a page-directory-pointer or page-directory entry with the PS bit maps a 1 GiB or 2 MiB page (its PAT
  bit cleared), whatever its Valid bit says, and the page is then present or not as above;
* a page-table page whose 512 entries are all the same is treated as absent (Volatility's guard against
  the identical filler tables of Windows 10);
* frame numbers keep the low 45 bits of an entry (Volatility's mask for Windows, which carries flags
  above them in transition entries);
* a page (or the part of a large page a request covers) counts only when the layer below holds all of
  its bytes.

Any other top layer (32-bit, PAE, Linux or Mac layers, a layer with swap files attached) is translated by
the layer itself: :func:`mapping` then simply passes the request on.

The pages a range's mapping leaves out are told apart by why (:func:`absence`): paged out (an entry, at any
level, that is not present but names where the page is: a pagefile offset, a prototype or a transition
entry), not in the image (a present entry whose page the layer below does not hold) and unmapped (no entry, or
one that names no page: demand-zero or decommitted).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from volatility3.framework import exceptions, interfaces
from volatility3.framework.layers import intel, linear, physical

PAGE_SIZE = intel.Intel32e.page_size  # a page-table page, and the smallest page it maps
ENTRIES = PAGE_SIZE // 8
VIRTUAL_BITS = 48
_LEVEL_SHIFTS = (39, 30, 21, 12)  # PML4, PDPT, PD, PT: the address bits each level's index starts at
_LARGE_LEVELS = (False, True, True, False)  # levels whose entries may map a page themselves (PS bit)
_VALID = 1
_LARGE = 1 << 7  # PS
_LARGE_PAT = 1 << 12  # PAT bit of a large page entry, cleared before the frame is taken
_PROTOTYPE = 1 << 10
_TRANSITION = 1 << 11
_FEW = 64  # pages below which a request is answered in plain Python
_WINDOW = 1 << 30  # address span walked at once for a small request
_PAGEFILES = 16  # pagefile numbers a software entry can hold (four bits)
_PAGEFILE_OFFSET_SHIFT = 32  # a software entry's pagefile offset, as Volatility reads it: the entry's high half

Mapping = tuple[int, int, int, int, str]  # (address, length, physical address, length, layer name): as the layer
Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes, raising InvalidAddressException as the layer does
Filler = Callable[[int, memoryview], None]  # (offset, buffer) -> None: a Reader that fills the buffer given


@dataclass(frozen=True)
class Absence:
    """Pages of a range that no page maps, by why: what tells a responder whether the memory was gone on the
    machine or only from the image."""

    paged_out: int = 0  # not present, but the entry names where the page went (pagefile, prototype, transition)
    not_in_image: int = 0  # a present entry whose physical page the image does not hold (truncated or sparse)
    unmapped: int = 0  # no entry naming a page: none was there (empty, demand-zero or decommitted)

    @property
    def pages(self) -> int:
        return self.paged_out + self.not_in_image + self.unmapped


class PageTables:
    """The page tables of one Windows x64 kernel layer, read from the layer under it and kept once read."""

    def __init__(self, context: interfaces.context.ContextInterface, layer: intel.Intel):
        self._context = context
        self.physical_name: str = layer.config["memory_layer"]
        frame_mask = ((1 << layer._maxphyaddr) - 1) & ~(PAGE_SIZE - 1)
        self._frame_mask = np.uint64(frame_mask)
        self._root = layer.config["page_map_offset"] & frame_mask
        self._tables: dict[int, np.ndarray | None] = {}
        self._walked: list[tuple[int, int, tuple[np.ndarray, ...]]] = []  # windows walked, with their pages
        self._bounds = _plain_bounds(context.layers[self.physical_name])

    # -- reading tables ------------------------------------------------------
    def _table(self, address: int) -> np.ndarray | None:
        """The 512 entries of the table at physical ``address``, None when unreadable or all alike."""
        if address in self._tables:
            return self._tables[address]
        try:
            data = physical_reader(self._context, self.physical_name)(address, PAGE_SIZE)
        except exceptions.InvalidAddressException:
            table = None
        else:
            table = np.frombuffer(data, dtype="<u8")
            if (table == table[0]).all():
                table = None
        self._tables[address] = table
        return table

    # -- walking -------------------------------------------------------------
    def leaves(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pages mapped in the 48-bit range [start, end): their first address, size and frame base.

        Pages are listed whole (a large page may begin before ``start``), in address order.
        """
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._walk(self._root, 0, 0, start, end, found)
        if not found:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, empty, empty
        pages, sizes, frames = (np.concatenate(column) for column in zip(*found))
        order = np.argsort(pages, kind="stable")  # large pages were listed before the tables beside them
        return pages[order], sizes[order], frames[order]

    def _walk(self, table_address: int, level: int, base: int, start: int, end: int,
              found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        table = self._table(table_address)
        if table is None:
            return
        shift = _LEVEL_SHIFTS[level]
        first = max(start - base, 0) >> shift
        last = min((end - 1 - base) >> shift, ENTRIES - 1)
        entries = table[first : last + 1]
        indices = np.arange(first, last + 1, dtype=np.uint64)
        addresses = np.uint64(base) + (indices << np.uint64(shift))
        if _LARGE_LEVELS[level]:
            large = (entries & np.uint64(_LARGE)) != 0
            if large.any():
                pages = entries[large]
                pages = np.where(pages & np.uint64(_LARGE_PAT), pages - np.uint64(_LARGE_PAT), pages)
                self._add_leaves(addresses[large], pages, shift, found)
            entries, addresses = entries[~large], addresses[~large]
        if level == len(_LEVEL_SHIFTS) - 1:
            self._add_leaves(addresses, entries, shift, found)
            return
        present = _present(entries)
        frames = (entries[present] & self._frame_mask).tolist()
        for below, child in zip(addresses[present].tolist(), frames):
            self._walk(child, level + 1, below, start, end, found)

    def _add_leaves(self, addresses: np.ndarray, entries: np.ndarray, shift: int,
                    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
        present = _present(entries)
        if present.any():
            sizes = np.full(int(present.sum()), 1 << shift, dtype=np.uint64)
            found.append((addresses[present], sizes, entries[present] & self._frame_mask))
        if len(found) > 64:  # keep the pieces few: one concatenation per walk, not one per table
            found[:] = [tuple(np.concatenate(column) for column in zip(*found))]

    # -- the layer's mapping ---------------------------------------------------
    def mapping(self, start: int, size: int) -> list[Mapping]:
        """What ``layer.mapping(start, size, ignore_errors=True)`` yields, computed from the tables in bulk."""
        if size <= 0:
            return []
        low = start & ((1 << VIRTUAL_BITS) - 1)
        prefix = start - low  # the caller's (canonical) numbering of the same addresses
        end = min(low + size, 1 << VIRTUAL_BITS)
        pages, sizes, frames = self._covering(low, end)
        if len(pages) <= _FEW:
            pieces = _clipped_pieces(pages.tolist(), sizes.tolist(), frames.tolist(), low, end)
            return self._runs(prefix, [piece for piece in pieces if self._holds(piece[2], piece[1])])
        offsets, lengths, targets = _clipped(pages, sizes, frames, low, end)
        keep = self._readable(targets, lengths)
        if not keep.all():
            offsets, lengths, targets = offsets[keep], lengths[keep], targets[keep]
        return self._runs(prefix, zip(offsets.tolist(), lengths.tolist(), targets.tolist()))

    def absence(self, start: int, size: int) -> Absence:
        """Why the pages of [start, start + size) that :meth:`mapping` leaves out are missing (see the module
        notes); a range is counted in whole pages."""
        low = start & ((1 << VIRTUAL_BITS) - 1)
        end = min(low + size, 1 << VIRTUAL_BITS)
        if end <= low:
            return Absence()
        offsets, lengths, targets = _clipped(*self._covering(low, end), low, end)
        present = int(lengths.sum())
        outside = present - int(lengths[self._readable(targets, lengths)].sum()) if present else 0
        named = self._named_absent(self._root, 0, 0, low, end)
        return Absence(named // PAGE_SIZE, outside // PAGE_SIZE, (end - low - present - named) // PAGE_SIZE)

    def _named_absent(self, table_address: int, level: int, base: int, start: int, end: int) -> int:
        """Bytes of [start, end) under entries that are not present but name where the page is, at any level."""
        table = self._table(table_address)
        if table is None:
            return 0
        shift = _LEVEL_SHIFTS[level]
        first = max(start - base, 0) >> shift
        last = min((end - 1 - base) >> shift, ENTRIES - 1)
        entries = table[first : last + 1]
        addresses = np.uint64(base) + (np.arange(first, last + 1, dtype=np.uint64) << np.uint64(shift))
        present = _present(entries)
        named = _names_absent_page(entries)
        covered = (np.minimum(addresses[named] + np.uint64(1 << shift), np.uint64(end))
                   - np.maximum(addresses[named], np.uint64(start)))
        total = int(covered.sum())
        if level == len(_LEVEL_SHIFTS) - 1:
            return total
        below = present & ((entries & np.uint64(_LARGE)) == 0) if _LARGE_LEVELS[level] else present
        frames = (entries[below] & self._frame_mask).tolist()
        for child_base, child in zip(addresses[below].tolist(), frames):
            total += self._named_absent(child, level + 1, child_base, start, end)
        return total

    def _runs(self, prefix: int, pieces) -> list[Mapping]:
        """Pieces (address, length, physical address) in order, joined where both sides continue: the
        layer's runs."""
        runs: list[list[int]] = []
        for offset, length, target in pieces:
            if runs and runs[-1][0] + runs[-1][1] == offset and runs[-1][2] + runs[-1][1] == target:
                runs[-1][1] += length
            else:
                runs.append([offset, length, target])
        name = self.physical_name
        return [(prefix + offset, length, target, length, name) for offset, length, target in runs]

    def _covering(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pages of [start, end), from a window walked earlier when one holds the range."""
        pages, sizes, frames, ends = self._window(start, end)
        first = int(np.searchsorted(ends, np.uint64(start), side="right"))
        last = int(np.searchsorted(pages, np.uint64(end), side="left"))
        return pages[first:last], sizes[first:last], frames[first:last]

    def _window(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The leaves (pages, sizes, frames, ends) of a walked window holding [start, end), walked now if none.

        Walks go by whole 1 GiB windows: a pool walk asks for thousands of small ranges close together,
        and one walk of the window around the first serves the rest.
        """
        for low, high, leaves in reversed(self._walked):
            if low <= start and end <= high:
                return leaves
        low = start & ~(_WINDOW - 1)
        high = min(-(-end // _WINDOW) * _WINDOW, 1 << VIRTUAL_BITS)
        pages, sizes, frames = self.leaves(low, high)
        leaves = (pages, sizes, frames, pages + sizes)
        self._walked.append((low, high, leaves))
        return leaves

    def targets(self, addresses: list[int], size: int) -> list[int | None]:
        """Where ``size`` bytes at each address (none crossing a page) lie in the layer below, as :meth:`mapping`
        of each would say; None where it maps nothing.  One lookup for all: a list walk has thousands."""
        mask = (1 << VIRTUAL_BITS) - 1
        low = np.array([address & mask for address in addresses], dtype=np.uint64)
        found = np.zeros(len(low), dtype=np.uint64)
        mapped = np.zeros(len(low), dtype=bool)
        for window in np.unique(low >> np.uint64(30)).tolist():
            rows = np.flatnonzero((low >> np.uint64(30)) == np.uint64(window))
            pages, sizes, frames, ends = self._window(window << 30, (window + 1) << 30)
            if not len(pages):
                continue
            here = low[rows]
            index = np.minimum(np.searchsorted(ends, here, side="right"), len(pages) - 1)
            inside = (pages[index] <= here) & (here + np.uint64(size) <= ends[index])
            target = frames[index] | (here & (sizes[index] - np.uint64(1)))
            inside &= self._readable(target, np.full(len(rows), size, dtype=np.uint64))
            found[rows], mapped[rows] = target, inside
        return [int(target) if ok else None for target, ok in zip(found.tolist(), mapped.tolist())]

    def _holds(self, target: int, length: int) -> bool:
        """Whether the layer below holds all of [target, target + length) (its ``is_valid``)."""
        if self._bounds is not None:
            return self._bounds[0] <= target and target + length - 1 <= self._bounds[1]
        return self._context.layers[self.physical_name].is_valid(target, length)

    def _readable(self, targets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Which physical pieces the layer below holds in full (its ``is_valid``)."""
        if self._bounds is not None:
            low, high = self._bounds
            return (targets >= np.uint64(low)) & (targets + lengths - np.uint64(1) <= np.uint64(high))
        below = self._context.layers[self.physical_name]
        return np.array([below.is_valid(target, length) for target, length in
                         zip(targets.tolist(), lengths.tolist())], dtype=bool)


def _present(entries: np.ndarray) -> np.ndarray:
    """Windows' notion of a usable entry: Valid, or in transition and not a prototype."""
    valid = (entries & np.uint64(_VALID)) != 0
    transition = (entries & np.uint64(_TRANSITION | _PROTOTYPE)) == np.uint64(_TRANSITION)
    return valid | transition


def _names_absent_page(entries: np.ndarray) -> np.ndarray:
    """Entries that are not present but say where their page is: in a pagefile, behind a prototype entry, or in
    transition (a prototype transition entry, which Volatility does not read)."""
    elsewhere = (entries >> np.uint64(_PAGEFILE_OFFSET_SHIFT)) != 0
    software = (entries & np.uint64(_TRANSITION | _PROTOTYPE)) != 0
    return ~_present(entries) & (elsewhere | software)


def _clipped(pages: np.ndarray, sizes: np.ndarray, frames: np.ndarray, start: int,
             end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The part of each page inside [start, end), and where it starts physically.

    The physical start is the frame base ORed with the offset into the page, as the layer computes it.
    """
    offsets = np.maximum(pages, np.uint64(start))
    lengths = np.minimum(pages + sizes, np.uint64(end)) - offsets
    targets = frames | (offsets & (sizes - np.uint64(1)))
    return offsets, lengths, targets


def _clipped_pieces(pages: list[int], sizes: list[int], frames: list[int], start: int,
                    end: int) -> list[tuple[int, int, int]]:
    """:func:`_clipped` for a few pages, without numpy's per-call cost."""
    pieces = []
    for page, size, frame in zip(pages, sizes, frames):
        offset = max(page, start)
        pieces.append((offset, min(page + size, end) - offset, frame | (offset & (size - 1))))
    return pieces


def _plain_bounds(layer: interfaces.layers.DataLayerInterface) -> tuple[int, int] | None:
    """The address bounds of a file or buffer layer, whose ``is_valid`` is a bounds check; None for others."""
    if type(layer) in (physical.FileLayer, physical.BufferDataLayer):
        return layer.minimum_address, layer.maximum_address
    return None


def handles(layer: interfaces.layers.DataLayerInterface) -> bool:
    """Whether :class:`PageTables` reproduces this layer's translation: a Windows x64 layer, no swap files.

    The layer sends a pagefile entry to the swap layer its config names for the entry's pagefile number;
    without one the page is simply unreadable, as here.
    """
    if type(layer) is not intel.WindowsIntel32e:
        return False
    return not any(layer.config.get(interfaces.configuration.path_join("swap_layers", f"swap_layers{number}"))
                   for number in range(_PAGEFILES))


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its PageTables, or None


def page_tables(context: interfaces.context.ContextInterface, layer_name: str) -> PageTables | None:
    """The bulk translator of a layer, or None when the layer must translate.

    Kept as long as the layer lives: the tables hold their context weakly, so an image's context still goes
    when its last user drops it.
    """
    layer = context.layers[layer_name]
    if layer not in _KEPT:
        _KEPT[layer] = PageTables(weakref.proxy(context), layer) if handles(layer) else None
    return _KEPT[layer]


def mapping(context: interfaces.context.ContextInterface, layer_name: str, start: int,
            size: int) -> Iterator[Mapping]:
    """``layer.mapping(start, size, ignore_errors=True)``, in bulk when the layer is one this module reproduces."""
    tables = page_tables(context, layer_name)
    if tables is None:
        yield from context.layers[layer_name].mapping(start, size, ignore_errors=True)
    else:
        yield from tables.mapping(start, size)


def read_many(context: interfaces.context.ContextInterface, layer_name: str, addresses: list[int],
              size: int) -> list[bytes | None]:
    """``size`` bytes at each address (none crossing a page) as the layer's read gives them, None where it
    refuses; translated together where this module reproduces the layer."""
    tables = page_tables(context, layer_name)
    if tables is None:
        return [_read_or_none(context.layers[layer_name].read, address, size) for address in addresses]
    read = physical_reader(context, tables.physical_name)
    return [None if target is None else _read_or_none(read, target, size)
            for target in tables.targets(addresses, size)]


def _read_or_none(read: Reader, address: int, size: int) -> bytes | None:
    try:
        return read(address, size)
    except exceptions.InvalidAddressException:
        return None


def absence(context: interfaces.context.ContextInterface, layer_name: str, start: int, size: int) -> Absence:
    """Why the pages of [start, start + size) that :func:`mapping` leaves out are missing: in bulk where this
    module reproduces the layer, else page by page from the layer's own refusals (its PagedInvalidAddressException
    carries the entry that stopped it; a page it translates but the layer below does not hold is not in the
    image).  Page by page costs a translation each: ask it for the pages known to be missing, not whole regions.
    A large page the layer below holds only part of is the one difference: a range over it leaves the whole page
    out (as the mapping does), page by page only its pages past what is held count."""
    tables = page_tables(context, layer_name)
    if tables is not None:
        return tables.absence(start, size)
    layer = context.layers[layer_name]
    causes = {"paged_out": 0, "not_in_image": 0, "unmapped": 0}
    for page in range(start & ~(PAGE_SIZE - 1), start + size, PAGE_SIZE):
        cause = _page_cause(layer, page)
        if cause:
            causes[cause] += 1
    return Absence(**causes)


def _page_cause(layer: interfaces.layers.TranslationLayerInterface, page: int) -> str:
    """The :class:`Absence` field one page counts under, "" when the page is there.

    The layer's mapping refuses a page with the entry that stopped it, or, when the entry maps a page the layer
    below does not hold, with an error of that lower layer."""
    try:
        list(layer.mapping(page, PAGE_SIZE))
    except exceptions.PagedInvalidAddressException as error:
        entry = np.array([error.entry or 0], dtype=np.uint64)
        return "paged_out" if _names_absent_page(entry)[0] else "unmapped"
    except exceptions.InvalidAddressException as error:
        return "unmapped" if error.layer_name == layer.name else "not_in_image"
    return ""


def read(context: interfaces.context.ContextInterface, layer_name: str, start: int, size: int) -> tuple[bytes, int]:
    """``size`` bytes from ``start`` as ``layer.read(start, size, pad=True)`` gives them, and how many of them
    no page maps (read as zeros).  Each mapped piece is read straight into its place (:func:`physical_filler`)."""
    data = bytearray(size)
    view = memoryview(data)
    mapped = 0
    for offset, length, target, _, below in mapping(context, layer_name, start, size):
        place = view[offset - start : offset - start + length]
        try:
            physical_filler(context, below)(target, place)
        except exceptions.InvalidAddressException:  # a layer whose mapping names more than it holds
            place[:] = context.layers.read(below, target, length, pad=True)
        mapped += length
    return bytes(data), size - mapped


# --------------------------------------------------------------------------- reading the layer below


def layer_read(context: interfaces.context.ContextInterface, layer_name: str, address: int, size: int,
               pad: bool = False) -> bytes:
    """``layer.read(address, size, pad)``: the layer translates as it always does, and a read that maps to one
    piece is then taken through :func:`physical_reader`.

    An owner lookup makes a dozen small reads, and for each the file layer's own read (urllib's file wrapper,
    a seek, a lock) cost more than the translation.  Anything else (several pieces, a refusal, a layer whose
    reads are not its mapping's) is the layer's own read.
    """
    layer = context.layers[layer_name]
    if size > 0 and type(layer).read is linear.LinearlyMappedLayer.read:
        pieces = list(layer.mapping(address, size, ignore_errors=pad))
        if len(pieces) == 1 and pieces[0][0] == address and pieces[0][1] == size == pieces[0][3]:
            _, _, target, _, below = pieces[0]
            try:
                return physical_reader(context, below)(target, size)
            except exceptions.InvalidAddressException:
                pass
    return layer.read(address, size, pad=pad)


class _FileReader:
    """Reads a raw image file the way its file layer does, with one positioned read per piece.

    Volatility's file layer serves every read through urllib's file wrapper, a seek and a lock: several Python
    calls that cost more than the read itself when a pool walk makes tens of thousands of them.
    """

    def __init__(self, layer: physical.FileLayer, path: str):
        self._name = layer.name
        self._size = layer.maximum_address + 1
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __call__(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            raise exceptions.InvalidAddressException(self._name, offset + len(data), "Could not read sufficient bytes")
        return data

    def into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with what ``self(offset, len(view))`` gives, refusing as it does."""
        self._check(offset, len(view))
        got = os.preadv(self._fd, [view], offset)
        if got < len(view):
            raise exceptions.InvalidAddressException(self._name, offset + got, "Could not read sufficient bytes")

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self._size:  # the file layer's own refusal, address included
            where = self._size if 0 <= offset < self._size else offset
            raise exceptions.InvalidAddressException(self._name, where, "Offset outside of the buffer boundaries")


def _raw_file(layer: interfaces.layers.DataLayerInterface) -> str | None:
    """The local file a file layer reads as it is, or None: the layer may read another scheme, decompress the
    file, or run where positioned reads do not exist.  The file must be as large as the layer and begin with the
    same bytes."""
    if type(layer) is not physical.FileLayer or not hasattr(os, "pread") or not hasattr(os, "preadv"):
        return None
    location = urllib.parse.urlparse(layer.location)
    if location.scheme != "file":
        return None
    path = urllib.request.url2pathname(location.path)
    try:
        if os.path.getsize(path) != layer.maximum_address + 1:
            return None
        with open(path, "rb") as handle:
            start = handle.read(PAGE_SIZE)
    except OSError:
        return None
    return path if start == layer.read(0, len(start)) else None


_READERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its file reader, or None


def physical_reader(context: interfaces.context.ContextInterface, layer_name: str) -> Reader:
    """How bulk walks read the layer below a kernel layer: ``layer.read`` (no padding), straight from the file
    for a raw image file, through the layer for any other.  Kept as long as the layer lives."""
    layer = context.layers[layer_name]
    if layer not in _READERS:
        path = _raw_file(layer)
        _READERS[layer] = _FileReader(layer, path) if path else None
    return _READERS[layer] or layer.read


def physical_filler(context: interfaces.context.ContextInterface, layer_name: str) -> Filler:
    """:func:`physical_reader` that fills a caller's buffer: a walk gathering many pieces into one block reads
    each straight into its place, with no bytes object per piece and no join."""
    read = physical_reader(context, layer_name)
    if isinstance(read, _FileReader):
        return read.into

    def fill(offset: int, view: memoryview) -> None:
        view[:] = read(offset, len(view))

    return fill
