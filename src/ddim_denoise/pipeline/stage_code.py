"""The package folders each pipeline stage runs, found from their imports, and a digest of their source.

Each DVC stage depends on the folders of the package it runs (tests/test_stage_code.py holds dvc.yaml to
``stage_folders``), so `dvc repro` reruns a stage whose code changed. A training run resumes, and a sweep study goes on,
only under the same code (``code_digest`` is part of the run's and the study's identity): rerun after a code change,
training would otherwise resume its finished run and record the old model against the new code.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = __name__.split(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# The library module each stage's command calls; cli.py, which only parses its options, is left out.
STAGE_ENTRIES = {"prepare": "data.cifar10", "train": "training.distributed", "evaluate": "evaluation.evaluate",
                 "report": "evaluation.report", "sweep": "sweep.study", "serve-load": "serving.load_test"}


def module_file(module: str) -> Path | None:
    """The file of package module ``module`` ('core.unet', or a folder 'core' for its __init__), if there is one."""
    path = PACKAGE_DIR.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def package_imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its code (imports inside functions too)."""
    return file_imports(module_file(module))


def file_imports(path: Path) -> set[str]:
    """The package's modules that the Python file ``path`` (a module, or a script such as a benchmark) imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            base = node.module.removeprefix(PACKAGE).lstrip(".")
            # `from pkg.core import unet` names module core.unet; `from pkg.core.unet import UNet` names core.unet
            found.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
            found.add(base)
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix(PACKAGE + ".") for alias in node.names
                         if alias.name.startswith(PACKAGE + "."))
    return {name for name in found if name and module_file(name) is not None}


def stage_modules(entry: str) -> list[str]:
    """``entry`` and every package module it imports, directly or not, sorted."""
    modules, pending = set(), [entry]
    while pending:
        module = pending.pop()
        if module not in modules:
            modules.add(module)
            pending.extend(package_imports(module))
    return sorted(modules)


def module_folders(entries: Iterable[str]) -> list[str]:
    """The package folders (``core``, ``training``, ...) whose modules ``entries`` run, directly or not, sorted."""
    return sorted({module.split(".")[0] for entry in entries for module in stage_modules(entry) if "." in module})


def stage_folders(stage: str) -> list[str]:
    """The package folders whose modules ``stage`` runs."""
    return module_folders([STAGE_ENTRIES[stage]])


def script_folders(path: Path) -> list[str]:
    """The package folders whose modules the script ``path`` (a stage that runs a benchmark) runs."""
    return module_folders(file_imports(path))


def code_digest(stage: str) -> str:
    """sha256 (16 hex digits) of the source in the folders ``stage`` runs: what its DVC deps say it depends on."""
    digest = hashlib.sha256()
    for folder in stage_folders(stage):
        for path in sorted((PACKAGE_DIR / folder).rglob("*.py")):
            digest.update(f"{path.relative_to(PACKAGE_DIR).as_posix()}\n".encode() + path.read_bytes())
    return digest.hexdigest()[:16]
