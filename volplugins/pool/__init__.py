"""Windows kernel pool library: plain functions over a Volatility 3 context.

Modules, one concept each: ``model`` (the records every walker yields),
``kernel`` (the image's kernel: symbols, types, layer), ``regions``,
``classic``, ``segheap``, ``bigpages``, ``tracker``, ``objects``, ``tagdb``,
``owner`` (address -> owning chunk), ``scan`` (bulk walk of whole pools).
"""
