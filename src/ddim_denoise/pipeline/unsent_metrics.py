"""Metric points that MLflow did not take while its tracking server was unreachable, kept on disk until it does.

The file (``mlflow_unsent_<run id>.jsonl``) holds one JSON line per point: key, value, timestamp, step. Lines are
appended and flushed to disk one batch at a time, so a crash mid-write can tear only the last line: reading skips a
line that does not parse, and the next append starts on a fresh line. The file is named after its MLflow run: a later
process logging to the same run (a resumed training reopens it) sends the points there and removes the file.

At most ``max_lines`` points are kept: a long outage drops the oldest (with one warning) instead of filling the disk;
``training/steps.csv`` keeps every loss point anyway. Sending again after a send cut short repeats points already
sent; they keep their timestamps, and MLflow's SQL store takes a repeated (key, value, timestamp, step) as the same
point.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LINES = 100_000  # about 10 MB: more than a day of a loss point every second
BATCH_SIZE = 1000  # MLflow takes at most 1000 metrics per log_batch


def unsent_metrics_file(folder: str | Path, run_id: str) -> Path:
    return Path(folder) / f"mlflow_unsent_{run_id}.jsonl"


class UnsentMetrics:
    """The unsent metric points of one MLflow run, in the file ``path`` (created on the first ``append``)."""

    def __init__(self, path: str | Path, max_lines: int = MAX_LINES):
        self.path, self.max_lines = Path(path), max_lines
        self._lines: int | None = None  # lines in the file, counted on the first append
        self._warned_full = False

    def append(self, metrics: list) -> None:
        """Add MLflow ``Metric`` points at the end of the file, dropping the oldest beyond ``max_lines``."""
        lines = [json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"
                 for m in metrics][-self.max_lines:]
        count = self._count()
        if count + len(lines) > self.max_lines:
            # Down to 90% of the cap, not to the cap: the file is then rewritten once per tenth of it, not per append.
            count = self._keep_newest(max(self.max_lines - self.max_lines // 10 - len(lines), 0))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # torn by a crash: it then stands alone (and is skipped), spoiling no other
                    f.write(b"\n")
            f.write("".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())
        self._lines = count + len(lines)

    def read(self) -> list:
        """The points in the file (MLflow ``Metric``), oldest first; a torn line is skipped."""
        from mlflow.entities import Metric

        if not self.path.is_file():
            return []
        points = []
        for line in self.path.read_text().splitlines():
            try:
                point = json.loads(line)
                points.append(Metric(point["key"], float(point["value"]), int(point["timestamp"]), int(point["step"])))
            except (ValueError, KeyError, TypeError):
                continue
        return points

    def send(self, client, run_id: str) -> int:
        """Log the file's points to ``run_id`` with ``client`` (an MlflowClient), then remove the file; return how
        many were sent. A failure raises, and leaves the file for the next try."""
        if not self.path.is_file():
            return 0
        points = self.read()
        for start in range(0, len(points), BATCH_SIZE):
            client.log_batch(run_id, metrics=points[start : start + BATCH_SIZE])
        self.path.unlink(missing_ok=True)
        self._lines = 0
        return len(points)

    def _count(self) -> int:
        if self._lines is None:
            self._lines = len(self.path.read_bytes().splitlines()) if self.path.is_file() else 0
        return self._lines

    def _keep_newest(self, keep: int) -> int:
        """Rewrite the file with its newest ``keep`` lines (whole or not at all); return how many it holds."""
        lines = self.path.read_bytes().splitlines(keepends=True) if self.path.is_file() else []
        dropped = max(len(lines) - keep, 0)
        if not self._warned_full:
            log.warning("MLflow is still unreachable and %s holds its cap of %d metric points: dropping the oldest "
                        "(training/steps.csv keeps every loss point)", self.path, self.max_lines)
            self._warned_full = True
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines(lines[dropped:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(lines) - dropped
