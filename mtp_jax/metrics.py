"""Where numbers go: metrics.jsonl and TensorBoard (process 0 only), and the console."""

from __future__ import annotations

import json
import math
import pathlib
import sys

from tqdm import tqdm


class MetricWriter:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume, events logged after the restored step are dropped first, so a run that was killed
    and resumed has exactly one line per logged step, as if it had never stopped. A run that
    starts at step 0 starts over: what an earlier attempt logged before dying without a checkpoint
    (its step-0 line included) is dropped."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._drop_after(resume_step)
        self.file = self.path.open("a")
        # Imported here: tensorboardX imports torch where it is installed (the [bench] and [hf]
        # extras), seconds that generate, evaluate and export, which only log lines, need not pay.
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), flush_secs=30)

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if step > 0 and (event := _parse_line(line)) is not None and event.get("step", 0) <= step
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        for name, value in scalars.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tensorboard.close()


def read_metrics(workdir) -> list[dict]:
    """All events of a run's metrics.jsonl ([] before its first), skipping a line torn by a kill."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [
        event for event in map(_parse_line, path.read_text().splitlines() if path.exists() else []) if event is not None
    ]


def _parse_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a line torn by a kill mid-write (or a blank one)
        return None


def log(message: str) -> None:
    """A console line that does not tear a progress bar."""
    tqdm.write(message, file=sys.stderr)
