"""Run metrics a person can plot: one JSON object per step in metrics.jsonl, the same scalars in
TensorBoard, a progress bar with ETA, and sample completions in samples.jsonl."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from etils import epath
from tqdm.auto import tqdm

from eureka_jax.workdirs import as_path, is_uri


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0,
                 show_progress: bool = True):
        self.workdir = as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = JsonlAppender(self.workdir / "metrics.jsonl")
        self._samples = JsonlAppender(self.workdir / "samples.jsonl")
        from tensorboardX import SummaryWriter

        # A string: tensorboardX writes gs:// and s3:// URIs itself, and str() of an
        # epath.Path keeps the scheme.
        self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                         dynamic_ncols=True, disable=not show_progress)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        self._jsonl.append([record])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def advance(self, step: int, metrics: dict[str, Any]) -> None:
        """Move the bar to `step` and show the main figures."""
        shown = {k: metrics[k] for k in ("reward/mean", "reward/accuracy", "eval/accuracy", "loss")
                 if k in metrics}
        self._bar.set_postfix({k.split("/")[-1]: f"{float(v):.3f}" for k, v in shown.items()})
        self._bar.update(step - self._bar.n)

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._samples.append([{"step": step, **sample} for sample in samples])

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        self._samples.close()
        self._tensorboard.close()


class NullWriter:
    """MetricsWriter's interface, writing nothing: what processes other than 0 of a multi-host
    run use, so that one run has one set of logs."""

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def advance(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlAppender:
    """One JSON object per line, appended to a file that a resumed run keeps extending.

    Object stores cannot append: gcsfs opens mode "a" as "w" (a resumed run would drop the earlier
    lines) and shows nothing until the file is closed. There the whole object is rewritten after
    each append instead; metrics and sample dumps are small enough for that."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._rewrite = is_uri(path)
        if self._rewrite:
            self._text = path.read_text() if path.exists() else ""
        else:
            self._file = path.open("a")

    def append(self, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(record) + "\n" for record in records)
        if self._rewrite:
            self._text += lines
            self.path.write_text(self._text)
        else:
            self._file.write(lines)
            self._file.flush()

    def close(self) -> None:
        if not self._rewrite:
            self._file.close()


def _plain(value):
    """JAX/NumPy scalars -> Python numbers for JSON."""
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: str | os.PathLike,
                keys=("eval/accuracy", "reward/accuracy", "reward/mean"),
                output: str = "curves.png") -> epath.Path | None:
    """A PNG of the main curves (the last record of each step wins, as after a resume)."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in read_metrics(workdir):
        by_step.setdefault(record["step"], {}).update(record)
    if not by_step:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = sorted((s, r[key]) for s, r in by_step.items() if r.get(key) is not None)
        if points:
            axis.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval") else None,
                      label=key)
    axis.set_xlabel("step")
    axis.set_ylim(-0.02, 1.6)
    axis.grid(alpha=0.3)
    axis.legend()
    path = as_path(workdir) / output
    figure.tight_layout()
    with path.open("wb") as png:  # a file object: matplotlib would take a gs:// URI as local
        figure.savefig(png, format="png", dpi=100)
    plt.close(figure)
    return path
