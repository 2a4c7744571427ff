"""``poolbatch``: the suite's plugins over many memory images, locally or on a Dask cluster.

Modules: ``jobs`` (images, plugin choices and baselines turned into one job per
image), ``worker`` (one image, in a process of its own), ``outputs`` (the
output directory: JSON Lines per image and plugin, image records, resume),
``execute`` (local process pool or Dask, progress), ``summary``
(``summary.json``), ``fleet`` (tags compared across machines), ``cli``.
"""
