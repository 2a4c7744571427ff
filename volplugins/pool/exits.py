"""How a run ends when it cannot do everything that was asked: one line saying why, and an exit code.

Volatility 3's ``vol`` exits 0 after printing a table and 1 after its own errors (an image it cannot read, no
kernel found, an option it does not know). The plugins of this suite add two codes:

* :data:`REFUSED` (2, as for a command-line usage error): the request cannot be done at all (no address, an
  unreadable input file, options that exclude each other). One line names the plugin and the problem
  (``windows.poolowner: no address given: ...``); no table is printed.
* :data:`PARTIAL` (3): some inputs could not be used. The table holds the good rows and one row per bad input
  with its reason; the process then exits non-zero so that scripts notice.

A plugin decides everything that could refuse the run in ``run()``, before it hands Volatility its table: once
the renderer has started, a table is already on the screen.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn

from volatility3.framework import interfaces

REFUSED = 2
PARTIAL = 3


class Refused(SystemExit):
    """The run cannot do what was asked.

    A ``SystemExit``: ``vol`` catches only Volatility's own exceptions (and would print a bug-report banner for
    them), so this one ends the process with :data:`REFUSED` and nothing but the logged line. A script that
    constructs a plugin itself can catch it by this type.
    """

    def __init__(self, message: str):
        super().__init__(REFUSED)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(plugin: interfaces.plugins.PluginInterface, message: str) -> NoReturn:
    """Log ``message`` as the one error line, under the name the user ran ``plugin`` by, and stop before any row
    is produced."""
    _logger(plugin).error(message)
    raise Refused(message)


def plugin_name(plugin: interfaces.plugins.PluginInterface) -> str:
    """The name ``vol`` runs a plugin of this suite by (``windows.poolowner``): its module's place in the plugin
    directory, whichever package path the module was imported under."""
    return ".".join(type(plugin).__module__.split(".")[-2:])


def _logger(plugin: interfaces.plugins.PluginInterface) -> logging.Logger:
    """The logger a plugin's refusal or partial answer is told under: ``vol`` prints its name before the line."""
    return logging.getLogger(plugin_name(plugin))


def finish_partial(plugin: interfaces.plugins.PluginInterface, problems: int, what: str) -> None:
    """Say how many inputs could not be used and make ``vol`` exit with :data:`PARTIAL` after its table.

    Volatility's command line returns 0 once the renderer is done and offers no hook after it, so the exit code
    is set when the interpreter shuts down, after the table has been written and flushed. Only the ``vol``
    process itself is ended this way; a script or test that runs the plugin keeps its own exit status.
    """
    _logger(plugin).warning("%d %s could not be used; they are listed with their reason", problems, what)
    if _run_by_vol_command():
        atexit.register(_exit_partial)


def _run_by_vol_command() -> bool:
    """Whether this process is Volatility's ``vol`` command line (its ``__main__`` runs ``volatility3.cli.main``)."""
    cli = sys.modules.get("volatility3.cli")
    main = getattr(sys.modules.get("__main__"), "main", None)
    return cli is not None and main is getattr(cli, "main", None)


def _exit_partial() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(PARTIAL)
