"""Run Volatility 3 plugins in-process on one memory image and get their rows as plain dicts.

Automagic (finding the page tables and the kernel) is the slow part of a run,
so it runs once per image: later plugins start from the kernel configuration
the first run found, each in a fresh configuration path of its own so that no
option of one run carries over to the next.  Scripts, the test suite and
``poolbatch`` all drive plugins through this one runner.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Iterable

import volatility3.plugins
import volatility3.symbols
from volatility3 import framework
from volatility3.framework import automagic, constants, contexts, interfaces, plugins
from volatility3.framework.automagic import symbol_cache
from volatility3.framework.configuration import requirements

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "plugins"  # holds windows/, the suite's plugins and nothing else
INFO_PLUGIN = "windows.info.Info"

_imported = False


def configure(cache_dir: Path, symbol_dirs: Iterable[Path] = (), offline: bool = True) -> None:
    """Process-wide Volatility settings: the suite's plugins first, extra symbol directories, cache and network.

    Volatility keeps these in module globals, so every session of a process shares them; the cache directory
    is set again by each session before it runs automagic.
    """
    global _imported
    constants.OFFLINE = offline
    constants.PARALLELISM = constants.Parallelism.Off
    _set_cache(cache_dir)
    for directory in reversed([str(Path(path).resolve()) for path in symbol_dirs]):
        if directory not in volatility3.symbols.__path__:
            volatility3.symbols.__path__.insert(0, directory)
    if _imported:
        return
    volatility3.plugins.__path__ = [str(PLUGIN_DIR)] + constants.PLUGINS_PATH
    # Volatility 3's Windows plugin package may have been imported before the path above was set: its merged
    # __path__ must then learn about the suite's plugin directory too.
    windows = sys.modules.get("volatility3.plugins.windows")
    if windows is not None and str(PLUGIN_DIR / "windows") not in windows.__path__:
        windows.__path__.insert(0, str(PLUGIN_DIR / "windows"))
    framework.import_files(volatility3.plugins, True)
    _imported = True


def _set_cache(cache_dir: Path) -> None:
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    constants.CACHE_PATH = str(cache_dir)


def build_symbol_cache(cache_dir: Path) -> Path:
    """Index every symbol table on the symbol path into ``cache_dir`` (what automagic does first on every new
    cache, the slow part of opening an image); returns the index file, which other cache directories may copy."""
    _set_cache(cache_dir)
    index = Path(cache_dir) / constants.IDENTIFIERS_FILENAME
    symbol_cache.SqliteCache(str(index)).update()
    return index


def plugin_class(name: str) -> type[interfaces.plugins.PluginInterface]:
    """The plugin class for a full name (``windows.pooltags.PoolTags``) or, like ``vol``, a unique prefix of one
    (``windows.pooltags``); KeyError names the candidates when there are none or several."""
    available = framework.list_plugins()
    if name in available:
        return available[name]
    matches = sorted(full for full in available if full.startswith(name + "."))
    if len(matches) != 1:
        raise KeyError(f"plugin {name!r} " + (f"is ambiguous: {', '.join(matches)}" if matches else "not found"))
    return available[matches[0]]


class VolSession:
    """One image, one context: run plugins by name and get their rows as dicts."""

    def __init__(self, image: Path, cache_dir: Path, symbol_dirs: Iterable[Path] = (), offline: bool = True):
        configure(cache_dir, symbol_dirs, offline)
        self.image = Path(image)
        self.cache_dir = Path(cache_dir)
        self.context = contexts.Context()
        self.context.config["automagic.LayerStacker.single_location"] = (
            requirements.URIRequirement.location_from_file(str(self.image.resolve()))
        )
        self._found: dict[str, object] = {}  # what automagic configured, by key under the plugin's path
        self._kernel_path: str | None = None
        self._runs = itertools.count()

    def construct(self, plugin_name: str, **options) -> interfaces.plugins.PluginInterface:
        plugin = plugin_class(plugin_name)
        base_path = f"plugins.run{next(self._runs)}"
        config_path = interfaces.configuration.path_join(base_path, plugin.__name__)
        for key, value in self._found.items():
            self.context.config[interfaces.configuration.path_join(config_path, key)] = value
        for key, value in options.items():
            self.context.config[interfaces.configuration.path_join(config_path, key)] = value
        _set_cache(self.cache_dir)
        chosen = automagic.choose_automagic(automagic.available(self.context), plugin)
        constructed = plugins.construct_plugin(self.context, chosen, plugin, base_path, None, None)
        if not self._found:
            self._remember_found(plugin, config_path)
        return constructed

    def _remember_found(self, plugin: type[interfaces.plugins.PluginInterface], config_path: str) -> None:
        """Keep the settings automagic made for the plugin's kernel, layer and symbol requirements (not its
        options), so later runs start from them."""
        found_names = {requirement.name for requirement in plugin.get_requirements()
                       if isinstance(requirement, interfaces.configuration.ConstructableRequirementInterface)}
        branch = self.context.config.branch(config_path)
        self._found = {key: branch[key] for key in dict(branch) if key.split(".", 1)[0] in found_names}
        kernels = [requirement.name for requirement in plugin.get_requirements()
                   if isinstance(requirement, requirements.ModuleRequirement)]
        if kernels:
            self._kernel_path = interfaces.configuration.path_join(config_path, kernels[0])

    def rows(self, plugin_name: str, **options) -> list[dict]:
        """Every row of the plugin's TreeGrid, depth first: column name -> value, plus ``_depth`` (1 at the top)."""
        grid = self.construct(plugin_name, **options).run()
        names = [column.name for column in grid.columns]
        out: list[dict] = []

        def visit(node, accumulator):
            accumulator.append({name: _plain(value) for name, value in zip(names, node.values)}
                               | {"_depth": node.path_depth})
            return accumulator

        grid.populate(visit, out)
        return out

    @property
    def kernel_module(self) -> str:
        """The name of the kernel module in the context (after the first run)."""
        if self._kernel_path is None:
            raise LookupError("no plugin with a kernel requirement has run on this session yet")
        return self.context.config[self._kernel_path]


def _plain(value):
    """Plain Python values: hints and Volatility's primitive objects (which do not pickle) become the int, str,
    float or bytes they stand for; absent values become None."""
    if isinstance(value, interfaces.renderers.BaseAbsentValue):
        return None
    for plain in (bool, int, float, str, bytes):
        if isinstance(value, plain):
            return plain(value)
    return value
