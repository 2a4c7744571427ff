"""The suite's Volatility 3 plugins, one directory per operating system as Volatility 3 lays them out.

Give this directory to ``vol -p`` to run a checkout's plugins: Volatility 3 imports every module under a
plugin directory, so it holds the plugins and nothing else (the library they use lives beside it, in
:mod:`volplugins.pool`, and is imported once, under its own name).
"""
