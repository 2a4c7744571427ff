"""Deterministic synthetic Windows x64 memory images with a ground-truth manifest.

Run ``python -m samples --help``.  The package models Windows, not the
suite's parser: it imports nothing from ``volplugins``.

Builders share an :class:`samples.image.Image`.  A pool builder (classic
pages or segment heap) offers ``allocate(size, tag, pool, state=...,
quota_process=None, cache_aligned=False) -> manifest.Allocation`` where
``size`` is the caller's requested byte count and ``pool`` one of
``NonPaged``, ``NonPagedNx``, ``Paged``, ``Session``; it lays out the chunk
as that allocator would, records it in the manifest and returns it (its
``body`` is the address the caller received).
"""
