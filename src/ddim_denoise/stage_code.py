"""The package modules each pipeline stage runs, found from their imports, and a digest of their source.

dvc.yaml lists each stage's modules as its deps (tests/test_stage_code.py holds the lists to ``stage_modules``), so
`dvc repro` reruns a stage whose code changed. A training run resumes, and a sweep study goes on, only under the same
code (``code_digest`` is part of ``train.run_fingerprint`` and ``sweep.study_settings``): rerun after a code change,
training would otherwise resume its finished run and record the old model against the new code.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent
# The library module each stage's command calls; cli.py, which only parses its options, is left out.
STAGE_ENTRIES = {"prepare": ("data",), "train": ("distributed",), "evaluate": ("evaluate",),
                 "report": ("report",), "sweep": ("sweep",)}


def package_imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its code (imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE_DIR / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level == 0 and not name.startswith(PACKAGE + "."):
                continue
            name = name.removeprefix(PACKAGE + ".") if node.level == 0 else name
            # `from .x import y` names module x; `from . import x` names module x itself
            found.update([name.split(".")[0]] if name else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith(PACKAGE + "."))
    return {name for name in found if (PACKAGE_DIR / f"{name}.py").is_file()}


def stage_modules(entries: tuple[str, ...]) -> list[str]:
    """``entries`` and every package module they import, directly or not, sorted."""
    modules, pending = set(), list(entries)
    while pending:
        module = pending.pop()
        if module not in modules:
            modules.add(module)
            pending.extend(package_imports(module))
    return sorted(modules)


def code_digest(stage: str) -> str:
    """sha256 (16 hex digits) of the source of the modules ``stage`` runs."""
    digest = hashlib.sha256()
    for module in stage_modules(STAGE_ENTRIES[stage]):
        digest.update(f"{module}\n".encode() + (PACKAGE_DIR / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]
