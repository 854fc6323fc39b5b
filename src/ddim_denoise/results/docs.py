"""Generated blocks: the figures in README.md and docs/*.md, written from the files the pipeline commits.

A block is the text between two markers in a Markdown file::

    <!-- generated: NAME, from FILE, FILE; rerun: ddim-denoise docs -->
    ...
    <!-- end generated: NAME -->

``BLOCKS[NAME]`` names the tracked files the text comes from and renders it. ``write_docs`` rewrites every block,
opening marker included, so its list of files stays the registry's; with ``check`` it changes nothing and lists the
blocks that differ from what their files give. A figure typed in by hand, or left behind by a new ``dvc repro``, thus
fails ``ddim-denoise docs --check`` (and tests/test_readme.py) instead of going stale quietly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ddim_denoise.evaluation.evaluate import TABLE_COLUMNS
from ddim_denoise.evaluation.report import findings, results_table
from ddim_denoise.pipeline.checkpoint import atomic_write_text
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.results import headline, levers, photos, search, serving_load, speed, transfer
from ddim_denoise.results.sources import EVALUATION_TABLE, TRAINING_SUMMARY, read_csv, training_summary

RERUN = "ddim-denoise docs"
MARKDOWN_FILES = ("README.md", "docs/*.md")  # repository-relative globs


NAME = r"(?P<name>[\w-]+)(?![\w-])"
OPENING = re.compile(rf"^<!-- generated: {NAME}.*$", re.MULTILINE)
BLOCK = re.compile(rf"^<!-- generated: {NAME}[^\n]*\n.*?^<!-- end generated: (?P=name) -->$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    sources: tuple[str, ...]  # the tracked, repository-relative files that ``render`` reads
    render: Callable[[Path], str]  # repository root -> the Markdown between the markers


def quick_profile(root: Path, keep_finding: Callable[[str], bool]) -> str:
    """The committed run's results table under a line saying what it is, then the findings ``keep_finding`` keeps."""
    table, summary = read_csv(root, EVALUATION_TABLE, TABLE_COLUMNS), training_summary(root)
    lead = (f"`dvc repro` with the default `quick` profile, on the first {table.n_images.max()} CIFAR-10 test images; "
            f"PSNR (dB) / SSIM, n = images per method; training took {summary['train_seconds']:.0f} s in "
            f"{summary['precision']} on {summary['device_name']}.")
    notes = [f"- {note}" for note in findings(table) if keep_finding(note)]
    return "\n".join([lead, "", results_table(table), "", *notes])


def readme_results(root: Path) -> str:
    """The README keeps one finding: the model against BM3D on BM3D's own images."""
    return quick_profile(root, lambda note: note.startswith("One-step model minus BM3D"))


def results_page_quick_profile(root: Path) -> str:
    return quick_profile(root, lambda note: True)


QUICK_PROFILE_FILES = (EVALUATION_TABLE, TRAINING_SUMMARY)
BLOCKS: dict[str, Block] = {
    "readme-results": Block(QUICK_PROFILE_FILES, readme_results),
    "results-quick-profile": Block(QUICK_PROFILE_FILES, results_page_quick_profile),
    "headline": Block(headline.MAIN_CHAIN.sources, headline.render),
    "readme-headline": Block(headline.sources(*headline.README_MODELS), headline.render_short),
    "recipe-cpu": Block(headline.CPU_RECIPE.sources, partial(headline.render, scored=headline.CPU_RECIPE)),
    "levers": Block(levers.SOURCES, levers.render),
    "serving-load": Block(serving_load.SOURCES, serving_load.render),
    "speed": Block(speed.SOURCES, speed.render),
    "photos": Block(photos.SOURCES, photos.render),
    "transfer": Block(transfer.SOURCES, transfer.render),
    "search": Block(search.SOURCES, search.render),
}


def marked(name: str, root: Path) -> str:
    """Block ``name`` as a Markdown file holds it: opening marker, text, end marker."""
    block = BLOCKS[name]
    return (f"<!-- generated: {name}, from {', '.join(block.sources)}; rerun: {RERUN} -->\n"
            f"{block.render(root).strip()}\n<!-- end generated: {name} -->")


def marker_problems(where: str, text: str) -> list[str]:
    """Opening markers that name no known block, or that have no end marker."""
    closed = {match.start() for match in BLOCK.finditer(text)}
    problems = []
    for match in OPENING.finditer(text):
        name = match["name"]
        if name not in BLOCKS:
            problems.append(f"{where}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        elif match.start() not in closed:
            problems.append(f"{where}: generated block {name} has no end marker `<!-- end generated: {name} -->`")
    return problems


def markdown_files(root: Path) -> list[Path]:
    return [path for pattern in MARKDOWN_FILES for path in sorted(root.glob(pattern))]


def filled(text: str, root: Path, rendered: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with each known block rendered afresh (``rendered`` caches them), and the names of the changed ones."""
    changed = []

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            return match[0]  # marker_problems reports it
        fresh = rendered.setdefault(name, marked(name, root))
        if match[0] != fresh:
            changed.append(name)
        return fresh

    return BLOCK.sub(fill, text), changed


def write_docs(repo_root: str | Path, check: bool = False) -> list[str]:
    """Rewrite every generated block of README.md and docs/*.md from its files; return one line per block rewritten.

    With ``check``, write nothing and return one line per block that differs from its files and per marker that
    names an unknown block or lacks its end. Without it, such markers raise ``DataError`` before anything is written.
    """
    root = Path(repo_root)
    rendered: dict[str, str] = {}  # each block is rendered once, however many places hold it
    problems, stale, rewritten = [], [], {}
    for path in markdown_files(root):
        where, text = path.relative_to(root).as_posix(), path.read_text()
        problems += marker_problems(where, text)
        new_text, changed = filled(text, root, rendered)
        stale += [(where, name) for name in changed]
        if changed:
            rewritten[path] = new_text
    if check:
        return problems + [f"{where}: block {name} differs from {', '.join(BLOCKS[name].sources)}; run `{RERUN}`"
                           for where, name in stale]
    if problems:
        raise DataError("; ".join(problems) + "; nothing written")
    for path, text in rewritten.items():
        atomic_write_text(path, text)
    return [f"{where}: rewrote block {name}" for where, name in stale]
