"""Where results go: never over their own input, and over an existing file only when the user asked for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ddim_denoise.pipeline.errors import InputError

LISTED_FILES = 3  # existing outputs named in the error line; the rest are counted


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same resolved path (symlinks, ``..``) or hard links to one inode."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): not the same file
        return False


def refuse_existing(outputs: Iterable[str | Path], overwrite_flag: str) -> None:
    """InputError naming the outputs that already exist, unless none does; ``overwrite_flag`` is how to allow it."""
    existing = [Path(path) for path in outputs if Path(path).exists()]
    if not existing:
        return
    named = ", ".join(map(str, existing[:LISTED_FILES]))
    if len(existing) > LISTED_FILES:
        named += f" and {len(existing) - LISTED_FILES} more"
    raise InputError(f"{named}: already exist{'s' if len(existing) == 1 else ''}; pass {overwrite_flag} to replace "
                     f"{'it' if len(existing) == 1 else 'them'}, or write elsewhere")
