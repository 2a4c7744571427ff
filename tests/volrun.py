"""Run Volatility 3 plugins in-process on a sample image, offline, with the samples' symbols.

Automagic (DTB and kernel search) runs once per image; later plugins reuse
its configuration, so a test suite can run many plugins on one image cheaply.
The command-line path (``vol ...``) is exercised separately by :func:`run_cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import volatility3.plugins
import volatility3.symbols
from volatility3 import framework
from volatility3.framework import automagic, constants, contexts, interfaces, plugins
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ROOT / "symbols"
PLUGINS = ROOT / "volplugins"

_initialised = False


def _initialise(cache_dir: Path) -> None:
    global _initialised
    if _initialised:
        return
    constants.OFFLINE = True
    constants.CACHE_PATH = str(cache_dir)
    constants.PARALLELISM = constants.Parallelism.Off
    volatility3.plugins.__path__ = [str(PLUGINS)] + constants.PLUGINS_PATH
    volatility3.symbols.__path__ = [str(SYMBOLS)] + constants.SYMBOL_BASEPATHS
    # A test module may have imported Volatility 3's Windows plugin package before the path above was set:
    # its merged __path__ must then learn about the checkout's plugin directory too.
    windows = sys.modules.get("volatility3.plugins.windows")
    if windows is not None and str(PLUGINS / "windows") not in windows.__path__:
        windows.__path__.insert(0, str(PLUGINS / "windows"))
    framework.import_files(volatility3.plugins, True)
    _initialised = True


class VolSession:
    """One image, one context: run plugins by name and get their rows as dicts."""

    def __init__(self, image: Path, cache_dir: Path):
        _initialise(cache_dir)
        self.image = Path(image)
        self.context = contexts.Context()
        self.context.config["automagic.LayerStacker.single_location"] = (
            requirements.URIRequirement.location_from_file(str(self.image))
        )
        self._configured_path: str | None = None

    def construct(self, plugin_name: str, **options) -> interfaces.plugins.PluginInterface:
        plugin = framework.list_plugins()[plugin_name]
        config_path = interfaces.configuration.path_join("plugins", plugin.__name__)
        if self._configured_path and self._configured_path != config_path:
            self.context.config.splice(config_path, self.context.config.branch(self._configured_path))
        for key, value in options.items():
            self.context.config[interfaces.configuration.path_join(config_path, key)] = value
        chosen = automagic.choose_automagic(automagic.available(self.context), plugin)
        constructed = plugins.construct_plugin(self.context, chosen, plugin, "plugins", None, None)
        self._configured_path = self._configured_path or config_path
        return constructed

    def rows(self, plugin_name: str, **options) -> list[dict]:
        grid = self.construct(plugin_name, **options).run()
        names = [column.name for column in grid.columns]
        out: list[dict] = []

        def visit(node, accumulator):
            accumulator.append({name: _plain(value) for name, value in zip(names, node.values)} | {"_depth": node.path_depth})
            return accumulator

        grid.populate(visit, out)
        return out

    @property
    def kernel_module(self) -> str:
        return self.context.config[interfaces.configuration.path_join(self._configured_path, "kernel")]


def _plain(value):
    if isinstance(value, format_hints.Hex):
        return int(value)
    if isinstance(value, interfaces.renderers.BaseAbsentValue):
        return None
    return value


def run_cli(*arguments: str, cache_dir: Path, renderer: str = "json", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``vol`` as a user would (plugins from the checkout, samples' symbols, offline)."""
    command = [
        str(Path(sys.executable).with_name("vol")),
        "-q", "--offline", "--cache-path", str(cache_dir), "-s", str(SYMBOLS), "-p", str(PLUGINS),
        "-r", renderer, *arguments,
    ]
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def cli_json(*arguments: str, cache_dir: Path) -> list[dict]:
    result = run_cli(*arguments, cache_dir=cache_dir)
    if result.returncode != 0:
        raise AssertionError(f"vol {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)
