"""Run Volatility 3 plugins on a sample image, offline, with the samples' symbols.

In-process runs go through the library's runner (automagic once per image);
the command-line path (``vol ...``) is exercised separately by :func:`run_cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from volplugins.pool import runner, tags

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ROOT / "symbols"
PLUGINS = ROOT / "volplugins" / "plugins"


class VolSession(runner.VolSession):
    """The library's session with the samples' symbols (and ``extra_symbols``, such as an unseen build's), offline."""

    def __init__(self, image: Path, cache_dir: Path, extra_symbols: tuple[Path, ...] = ()):
        super().__init__(image, cache_dir, symbol_dirs=[SYMBOLS, *extra_symbols], offline=True)


def run_cli(*arguments: str, cache_dir: Path, renderer: str = "json", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``vol`` as a user would (plugins from the checkout, samples' symbols, offline)."""
    command = [
        str(Path(sys.executable).with_name("vol")),
        "-q", "--offline", "--cache-path", str(cache_dir), "-s", str(SYMBOLS), "-p", str(PLUGINS),
        "-r", renderer, *arguments,
    ]
    environment = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def raw_tag_text(row: dict) -> str:
    """A row's tag as the manifests write it: the protected bit the Protected column reports set again."""
    raw = tags.tag_from_text(row["Tag"])
    return tags.tag_text(tags.protected(raw) if row.get("Protected") else raw)


def cli_json(*arguments: str, cache_dir: Path) -> list[dict]:
    result = run_cli(*arguments, cache_dir=cache_dir)
    if result.returncode != 0:
        raise AssertionError(f"vol {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)
