"""The README's figures are the committed report's: its headline table is copied from reports/report.md."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_headline_table_is_the_committed_reports():
    readme = (REPO / "README.md").read_text().splitlines()
    report = (REPO / "reports" / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("| σ | noisy input"))
    table = [line for line in readme[start:] if line.startswith("|")][:6]
    assert len(table) == 6 and "\n".join(table) in "\n".join(report)
    paired = [line for line in readme if line.startswith("- One-step model minus BM3D")]
    assert paired and paired[0] in report


def test_the_first_code_blocks_are_the_two_commands():
    blocks = (REPO / "README.md").read_text().split("```bash\n")[1:3]
    run, tests = (block.split("```")[0].strip() for block in blocks)
    assert run.endswith("dvc repro") and "pip install -e '.[dev]'" in run
    assert tests.endswith("python -m pytest")


def test_the_readme_training_time_is_the_committed_reports():
    readme = (REPO / "README.md").read_text()
    report = (REPO / "reports" / "report.md").read_text()
    seconds = re.search(r"training took (\d+) s", readme).group(1)
    assert f"| training time | {seconds} s " in report
