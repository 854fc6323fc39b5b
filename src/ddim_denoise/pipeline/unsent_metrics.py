"""Metric points that MLflow did not take while its tracking server was unreachable, kept on disk until it does.

The file (``mlflow_unsent_<run id>.jsonl``) holds one JSON line per point: key, value, timestamp, step. Lines are
appended and flushed to disk one batch at a time, so a crash mid-write can tear only the last line: reading skips a
line that does not parse, and the next append starts on a fresh line. The file is named after its MLflow run: a later
process logging to the same run (a resumed training reopens it) sends the points there and removes the file, and so
does any run that starts in the same folder (``tracking.start_run``) for the files of other runs.

At most ``max_lines`` points are kept: a long outage drops the oldest (with one warning) instead of filling the disk;
``training/steps.csv`` keeps every loss point anyway. A batch the server refuses as invalid (HTTP 400) is dropped with
one warning, so that it cannot hold back the points after it forever. Sending again after a send cut short repeats
points already sent; they keep their timestamps, so an SQL store (the default sqlite file, or a server backed by a
database) takes a repeated (key, value, timestamp, step) as the same point, while a file store keeps both copies.
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


def refused_as_invalid(error: BaseException) -> bool:
    """Whether MLflow answered with HTTP 400 (INVALID_PARAMETER_VALUE, BAD_REQUEST): the request itself is wrong, and
    sending it again gets the same answer. An unreachable server is an MlflowException too, but with INTERNAL_ERROR
    (HTTP 500)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.get_http_status_code() == 400


FILE_PREFIX, FILE_SUFFIX = "mlflow_unsent_", ".jsonl"


def unsent_metrics_file(folder: str | Path, run_id: str) -> Path:
    return Path(folder) / f"{FILE_PREFIX}{run_id}{FILE_SUFFIX}"


def unsent_metrics_files(folder: str | Path) -> dict[str, Path]:
    """The unsent-metrics files in ``folder``, by the run id their names give."""
    return {path.name.removeprefix(FILE_PREFIX).removesuffix(FILE_SUFFIX): path
            for path in sorted(Path(folder).glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))}


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
        many were sent. A failure raises, and leaves the file for the next try; a batch refused as invalid is dropped
        instead (no retry changes the answer)."""
        if not self.path.is_file() or not self.path.stat().st_size:  # none kept, or emptied by ``clear``
            return 0
        points, sent = self.read(), 0
        for start in range(0, len(points), BATCH_SIZE):
            batch = points[start : start + BATCH_SIZE]
            try:
                client.log_batch(run_id, metrics=batch)
                sent += len(batch)
            except Exception as e:
                if not refused_as_invalid(e):
                    raise
                log.warning("MLflow refused %d metric points kept in %s as invalid (%s); dropping them", len(batch),
                            self.path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        self.clear()
        return sent

    def clear(self) -> None:
        """Remove the file; where it cannot be removed, empty it, so that its points are not sent again."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            self.path.write_bytes(b"")
        self._lines = 0

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
