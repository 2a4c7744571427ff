"""Reading the image for the walkers: kernel variables and fields that may be missing, and the pages of a walk."""

from __future__ import annotations

from volatility3.framework import exceptions

from ..kernel import PAGE_SIZE, Kernel, page_base, per_kernel


class Pages:
    """Reads the image a page at a time and keeps the pages, so a walk touches each page once.

    A caller that read a whole page range in one go hands it over as a span: reads inside it are slices.
    """

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self._pages: dict[int, bytes | None] = {}
        self._span_start = 0
        self._span = b""
        self._holes: frozenset[int] = frozenset()

    def preload_span(self, start: int, data: bytes, holes: frozenset[int] = frozenset()) -> None:
        """Contiguous bytes a caller already read from ``start`` (page aligned), zeros on the pages in ``holes``
        (their addresses), which could not be read."""
        self._span_start, self._span, self._holes = start, data, holes

    def buffer(self, start: int, end: int) -> tuple[bytes, int, frozenset[int]]:
        """[start, end) in one buffer: its bytes, the address they begin at, and its unreadable pages (zeros).

        The preloaded span serves it as it is when it holds the whole range; otherwise the pages are joined.
        """
        if self._span_start <= start and end <= self._span_start + len(self._span):
            return self._span, self._span_start, self._holes
        first = page_base(start)
        pages = [(base, self._page(base)) for base in range(first, end, PAGE_SIZE)]
        holes = frozenset(base for base, page in pages if page is None)
        return b"".join(bytes(PAGE_SIZE) if page is None else page for _, page in pages), first, holes

    def _page(self, base: int) -> bytes | None:
        offset = base - self._span_start
        if 0 <= offset < len(self._span):
            return None if base in self._holes else self._span[offset : offset + PAGE_SIZE]
        if base not in self._pages:
            try:
                self._pages[base] = self._kernel.read(base, PAGE_SIZE)
            except exceptions.InvalidAddressException:
                self._pages[base] = None
        return self._pages[base]

    def read(self, address: int, size: int) -> bytes | None:
        offset = address - self._span_start
        if 0 <= offset and offset + size <= len(self._span):
            if self._holes and not self._holes.isdisjoint(range(page_base(address), address + size, PAGE_SIZE)):
                return None
            return self._span[offset : offset + size]
        base = page_base(address)
        if address + size <= base + PAGE_SIZE:  # the common case: inside one page
            page = self._page(base)
            return None if page is None else page[address - base : address - base + size]
        out = bytearray()
        while size > 0:
            base = page_base(address)
            page = self._page(base)
            if page is None:
                return None
            take = min(size, base + PAGE_SIZE - address)
            out += page[address - base : address - base + take]
            address, size = address + take, size - take
        return bytes(out)


def read_bytes(kernel: Kernel, address: int, size: int) -> bytes | None:
    try:
        return kernel.read(address, size)
    except exceptions.InvalidAddressException:
        return None


def read_uint(kernel: Kernel, address: int, size: int) -> int | None:
    data = read_bytes(kernel, address, size)
    return None if data is None else int.from_bytes(data, "little")


def read_pointer(kernel: Kernel, address: int) -> int | None:
    return read_uint(kernel, address, kernel.type_size("pointer"))


def read_field(kernel: Kernel, base: int, type_name: str, path: str) -> int | None:
    """One field of the structure at ``base``, read with the width and bits the ISF gives it."""
    where = kernel.field_layout(type_name, path)
    data = read_bytes(kernel, base + where.offset, where.size)
    return None if data is None else where.alone.extract(data)


@per_kernel
def global_value(kernel: Kernel, name: str, size: int) -> int | None:
    """A kernel variable, or None when the symbol is missing or its page is not in the image."""
    if not kernel.has_symbol(name):
        return None
    return read_uint(kernel, kernel.symbol_address(name), size)
