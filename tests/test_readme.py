"""The README's and docs' results are written from committed files (``ddim-denoise docs``), and checked against them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.results.docs import BLOCKS, EVALUATION_TABLE

REPO = Path(__file__).resolve().parents[1]


def docs_command(root: Path, *options: str):
    return CliRunner().invoke(app, ["docs", "--root", str(root), *options])


def copy_of_the_docs(root: Path) -> Path:
    """README.md, docs/*.md and every file a generated block reads, copied under ``root`` (those committed: a study
    not run yet has none, and no marker in the docs asks for its block)."""
    files = {"README.md", *(path.relative_to(REPO) for path in REPO.glob("docs/*.md")),
             *(source for block in BLOCKS.values() for source in block.sources if (REPO / source).is_file())}
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / file, root / file)
    return root


def test_every_generated_block_matches_the_committed_files():
    result = docs_command(REPO, "--check")
    assert result.exit_code == 0, result.output


def test_a_changed_figure_makes_its_blocks_stale_until_docs_rewrites_them(tmp_path):
    root = copy_of_the_docs(tmp_path)
    table = pd.read_csv(root / EVALUATION_TABLE)
    bm3d_at_02 = (table.method == "bm3d") & np.isclose(table.sigma, 0.2)
    table.loc[bm3d_at_02, "psnr"] -= 1.0
    table.to_csv(root / EVALUATION_TABLE, index=False)
    new_cell = f"| {table.psnr[bm3d_at_02].item():.2f} / "

    stale = docs_command(root, "--check")
    assert stale.exit_code == 1
    assert {line.split(": block ")[1].split()[0] for line in stale.output.splitlines()} == {
        "readme-results", "results-quick-profile"}
    assert all("run `ddim-denoise docs`" in line for line in stale.output.splitlines())
    assert new_cell not in (root / "README.md").read_text()  # check wrote nothing

    assert docs_command(root).exit_code == 0
    assert docs_command(root, "--check").exit_code == 0
    assert new_cell in (root / "README.md").read_text() and new_cell in (root / "docs/results.md").read_text()


def test_a_hand_edited_figure_or_an_unknown_block_fails_the_check(tmp_path):
    root = copy_of_the_docs(tmp_path)
    readme = root / "README.md"
    paired = next(line for line in readme.read_text().splitlines() if line.startswith("- One-step model minus BM3D"))
    readme.write_text(readme.read_text().replace(paired, paired.replace(" dB", "0 dB", 1)))
    (root / "docs" / "extra.md").write_text("<!-- generated: no-such-block -->\n<!-- end generated: no-such-block -->\n")

    lines = docs_command(root, "--check").output.splitlines()
    assert lines[0].startswith("docs/extra.md: unknown generated block 'no-such-block'")
    assert lines[1].startswith("README.md: block readme-results differs from evaluation/psnr_vs_sigma.csv")
    assert len(lines) == 2
    written = docs_command(root)  # a marker that no block fills stops the rewrite before anything is written
    assert written.exit_code == 2 and "nothing written" in written.output
    assert paired not in readme.read_text()


def test_the_first_code_blocks_are_the_two_commands():
    blocks = (REPO / "README.md").read_text().split("```bash\n")[1:3]
    run, tests = (block.split("```")[0].strip() for block in blocks)
    assert run.endswith("dvc repro") and "pip install -e '.[dev]'" in run
    assert tests.endswith("python -m pytest")
