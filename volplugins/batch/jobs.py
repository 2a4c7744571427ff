"""What a batch does: the images (paths, globs, list files), the plugin runs chosen, baselines; one job per image.

Plugin runs are written like a ``vol`` command line without the image
(``"pooltags --scan"``) and parsed with the options Volatility 3 itself
builds from the plugin's requirements, so they mean exactly what they mean
on the command line.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import volatility3.cli

from volplugins.pool import runner

DEFAULT_PLUGINS = ("pooltags --scan", "poolcensus --validate", "poolcensus --carve")
INFO_PLUGIN = "windows.info.Info"
INFO_SLUG = "info"
LEAK_SLUG = "pooltags-baseline"  # the growth run against the image's baseline
POOLTAGS = "windows.pooltags.PoolTags"
IMAGE_SUFFIXES = (".raw", ".vmem", ".mem", ".dmp", ".img", ".bin", ".lime")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.]+")


@dataclass(frozen=True)
class PluginRun:
    """One plugin with its options; ``slug`` names its output file."""

    slug: str
    plugin: str  # full class name, e.g. windows.pooltags.PoolTags
    options: tuple[tuple[str, object], ...] = ()

    def describe(self) -> dict:
        return {"plugin": self.plugin, "options": dict(self.options)}


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker needs for one image; plain values, so it pickles to any process or cluster."""

    machine: str
    image: str
    runs: tuple[PluginRun, ...]
    cache_dir: str
    symbol_dirs: tuple[str, ...] = ()
    offline: bool = False
    baseline: str | None = None
    symbol_index: str | None = None  # a symbol cache index to start the image's cache from

    @property
    def all_runs(self) -> tuple[PluginRun, ...]:
        """The runs in order: the kernel's identity first, then the chosen plugins, then the growth run."""
        growth = (PluginRun(LEAK_SLUG, POOLTAGS, (("baseline", self.baseline),)),) if self.baseline else ()
        return (PluginRun(INFO_SLUG, INFO_PLUGIN),) + self.runs + growth


class _OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def parse_run(text: str) -> PluginRun:
    """``"pooltags --scan"`` -> the run; ValueError with a clear message for an unknown plugin or option."""
    words = shlex.split(text)
    if not words:
        raise ValueError("empty plugin choice")
    plugin = _plugin(words[0])
    parser = _OptionParser(prog=words[0], add_help=False)
    # An instance of CommandLine would install vol's console log handler on the root logger; building the
    # options uses nothing of an instance.
    volatility3.cli.CommandLine.populate_requirements_argparse(None, parser, plugin)
    try:
        parsed = vars(parser.parse_args(words[1:]))
    except ValueError as error:
        raise ValueError(f"{text!r}: {error}") from None
    options = tuple(sorted((name, value) for name, value in parsed.items()
                           if value is not None and value != parser.get_default(name)))
    slug = "-".join([plugin.__module__.rsplit(".", 1)[-1]] + [_SLUG_UNSAFE.sub("_", word.lstrip("-"))
                                                            for word in words[1:]])
    return PluginRun(slug, f"{plugin.__module__.removeprefix('volatility3.plugins.')}.{plugin.__name__}", options)


def _plugin(name: str):
    try:
        return runner.plugin_class(name)
    except KeyError as error:
        if name.startswith("windows."):
            raise ValueError(error.args[0]) from None
    try:
        return runner.plugin_class("windows." + name)
    except KeyError as error:
        raise ValueError(error.args[0]) from None


def parse_runs(texts: Iterable[str]) -> tuple[PluginRun, ...]:
    runs = tuple(parse_run(text) for text in texts)
    slugs = [run.slug for run in runs]
    repeated = sorted({slug for slug in slugs if slugs.count(slug) > 1} | ({INFO_SLUG, LEAK_SLUG} & set(slugs)))
    if repeated:
        raise ValueError(f"plugin runs chosen twice or reserved: {', '.join(repeated)}")
    return runs


@dataclass(frozen=True)
class Inputs:
    images: tuple[Path, ...]
    problems: tuple[str, ...]  # patterns or list files that gave nothing, said plainly


def expand_images(patterns: Iterable[str], list_files: Iterable[Path] = ()) -> Inputs:
    """Paths and globs in order, then each list file's lines (paths or globs, relative to the file's folder,
    ``#`` comments); each image once.  A plain path is kept even when missing: its job reports it."""
    found: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        _expand(pattern, Path.cwd(), found, problems)
    for list_file in list_files:
        try:
            lines = Path(list_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"list file {list_file}: cannot read: {error}")
            continue
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                _expand(line, Path(list_file).resolve().parent, found, problems)
    unique = tuple(dict.fromkeys(found))
    return Inputs(unique, tuple(problems))


def _expand(pattern: str, base: Path, found: list[Path], problems: list[str]) -> None:
    path = Path(pattern).expanduser()
    path = path if path.is_absolute() else base / path
    if not glob.has_magic(pattern):
        found.append(path.resolve())
        return
    matches = sorted(Path(match).resolve() for match in glob.glob(str(path), recursive=True)
                     if Path(match).is_file())
    if not matches:
        problems.append(f"{pattern}: no file matches")
    found.extend(matches)


def machine_names(images: Iterable[Path]) -> list[str]:
    """A name per image from its file name (without an image suffix), made unique with -2, -3... in order."""
    names: list[str] = []
    for image in images:
        stem = image.stem if image.suffix.lower() in IMAGE_SUFFIXES else image.name
        name, number = stem, 2
        while name in names:
            name, number = f"{stem}-{number}", number + 1
        names.append(name)
    return names


def load_baselines(path: Path) -> dict[str, Path]:
    """A JSON object: image (machine name, file name or path) -> baseline image (relative to the file's folder)."""
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"baselines file {path}: {error}") from None
    if not isinstance(mapping, dict) or not all(isinstance(value, str) for value in mapping.values()):
        raise ValueError(f"baselines file {path}: expected a JSON object of image -> baseline image path")
    base = Path(path).resolve().parent
    return {key: (base / Path(value).expanduser()).resolve() for key, value in mapping.items()}


def baseline_for(machine: str, image: Path, mapping: dict[str, Path], default: Path | None) -> Path | None:
    """The mapped baseline (by machine name, file name or path), else the default; never the image itself."""
    for key in (machine, image.name, str(image)):
        if key in mapping:
            chosen = mapping[key]
            break
    else:
        chosen = default
    return None if chosen is None or chosen == image else chosen
