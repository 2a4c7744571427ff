"""Seeded, deterministic fuzzing of the pool plugins over damaged sample images, in one process.

A campaign builds a sample image per flavor, then damages it again and again
(pool headers, segment heap headers and descriptors, big page table entries
and size, tracker rows, object headers, page-table entries, truncation), runs
every plugin's generator on each damaged copy and checks three things: no
exception escapes a plugin, no run exceeds its time bound, and every manifest
allocation the damage cannot have touched is still reported exactly.  Random
addresses (pool, kernel, user, unmapped, non-canonical) go through the owner
lookup the same way.  ``python -m fuzz --help`` runs one.

Like the tests, the fuzzer reads the image through its own means (the
samples' ISF reader and an x64 page walk) to choose what to damage and what
the damage can reach; the manifest is the oracle.
"""
