"""Installs the plugin modules where Volatility 3 looks for plugins.

Volatility 3 has no entry-point registration: it imports every module under
``volatility3/plugins/<os>/`` of its own installation.  The build step below
copies each plugin module of ``volplugins/plugins/windows`` (not its ``__init__.py``,
which belongs to Volatility 3) into that directory of the wheel, so a plain
``vol`` finds ``windows.poolowner`` and friends.  The plugins import their
logic from the ``volplugins`` package, which is installed normally.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PLUGIN_SOURCE = Path("volplugins") / "plugins" / "windows"
PLUGIN_TARGET = Path("volatility3") / "plugins" / "windows"


class BuildWithPlugins(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / PLUGIN_TARGET
        target.mkdir(parents=True, exist_ok=True)
        for plugin in sorted(PLUGIN_SOURCE.glob("*.py")):
            if not plugin.name.startswith("_"):
                shutil.copy2(plugin, target / plugin.name)


setup(cmdclass={"build_py": BuildWithPlugins})
