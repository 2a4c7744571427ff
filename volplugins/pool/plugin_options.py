"""Requirements every plugin of the suite shares, so options read and behave the same everywhere."""

from __future__ import annotations

from typing import Iterable

from volatility3.framework.configuration import requirements

from .attribution import DriverScan

TAG_PATTERN_HELP = ("'*' any run, '?' any byte, case sensitive, \\xNN for other bytes, short tags space padded; "
                    "several patterns may be given, or joined with commas")


def kernel() -> requirements.ModuleRequirement:
    return requirements.ModuleRequirement(
        name="kernel", description="Windows kernel", architectures=["Intel32", "Intel64"]
    )


def pooltag_files() -> requirements.ListRequirement:
    return requirements.ListRequirement(
        name="pooltag-file",
        element_type=str,
        description="Tag description file(s) in pooltag.txt format (also $VOLPOOL_POOLTAG_FILE; default: none)",
        optional=True,
    )


def tag_patterns(what: str, name: str = "tag") -> requirements.ListRequirement:
    """A list of tag patterns; ``what`` says what they select, e.g. "Only chunks whose tag matches one of these"."""
    return requirements.ListRequirement(
        name=name, element_type=str, description=f"{what} ({TAG_PATTERN_HELP}; default: none)", optional=True
    )


def flag(name: str, description: str) -> requirements.BooleanRequirement:
    """An on/off option, off unless given."""
    return requirements.BooleanRequirement(name=name, description=f"{description} (default: off)", default=False,
                                           optional=True)


def given(config, names: Iterable[str]) -> list[str]:
    """The options among ``names`` that a run was given, as a user types them (``--top 5``, ``--tag Nt* Irp``),
    so that a message can say which options it is about."""
    typed = []
    for name in names:
        value = config.get(name)
        if value is True:
            typed.append(f"--{name}")
        elif isinstance(value, list) and value:
            typed.append(f"--{name} {' '.join(map(str, value))}")
        elif value not in (None, False, []):
            typed.append(f"--{name} {value}")
    return typed


def driver_scan(default: DriverScan) -> requirements.ChoiceRequirement:
    """When to name tags' binaries from the loaded drivers' code; each plugin picks the default that suits
    how many tags it shows (a lookup shows few, a table hundreds)."""
    return requirements.ChoiceRequirement(
        name="driver-scan",
        choices=[mode.value for mode in DriverScan],
        description="Name the binary of tags the descriptions leave open from the loaded drivers' code: "
                    "auto = only when such a tag is shown, always, never "
                    f"(default: {default.value})",
        default=default.value,
        optional=True,
    )
