"""The two live views a trial is logged to, TensorBoard and MLflow: one run per trial, scalars by key and step, the
trial's params and tags, its final results (TensorBoard: for the hparams plugin) and its reconstruction figure.

Each imports its library only when a run is opened (the extras ``mae-lab[tensorboard]``, ``mae-lab[mlflow]``), so
nothing here loads unless a study asks for it. Neither writes a (key, step) it already holds: opening a trial's run
reads back the last step of every key (TensorBoard: the event files in the run's folder; MLflow: the run's metric
history), so a resumed trial, or a backfill over a live log, adds only what is new and no step appears twice.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_lab.errors import BadInput
from mae_lab.study.tables import TRACKERS


class TrackerError(BadInput, ValueError):
    """A tracker asked for that cannot be used: an unknown name, or its extra is not installed (bad input)."""


MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker -> the module its extra installs
MLFLOW_STATUS = {"done": "FINISHED", "failed": "FAILED", "diverged": "FAILED", "pruned": "KILLED",
                 "interrupted": "KILLED"}  # a trial's final status -> its MLflow run's


def parse_trackers(text: str, where: str = "--log") -> list[str]:
    """``"tensorboard,mlflow"`` -> the names, checked; TrackerError names ``where`` and the bad name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"{where}: unknown tracker {name!r} (valid: {', '.join(TRACKERS)})")
    return list(dict.fromkeys(names))


def require(names: list[str], where: str) -> None:
    """Every named tracker's library is installed; else TrackerError naming the extra that installs it."""
    for name in names:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise TrackerError(f"{where}: logging to {name} needs the extra: pip install 'mae-lab[{name}]'")


@dataclass(frozen=True)
class TrialMeta:
    """What names a trial in a view: its study, identity, axes and resolved spec."""

    study: str
    hash: str
    seed: int
    label: str
    commit: str | None
    axes: dict[str, Any]
    params: dict[str, Any]  # the resolved spec, flattened to dotted keys

    @property
    def run_name(self) -> str:
        """A stable, readable folder / run name: the axes, the seed and the hash."""
        label = re.sub(r"[^A-Za-z0-9._=+-]+", "_", self.label).strip("_")[:80] or "default"
        return f"{label}_s{self.seed}_{self.hash[:8]}"

    @property
    def tags(self) -> dict[str, str]:
        return {"study": self.study, "hash": self.hash, "seed": str(self.seed), "commit": self.commit or "unknown",
                "label": self.label}


def _plain(v: Any) -> int | float | str | bool:
    return v if isinstance(v, (int, float, str, bool)) else str(v)


class TensorBoardRun:
    """One trial's folder ``<root>/<study>/<run name>`` of TensorBoard event files (torch's SummaryWriter)."""

    name = "tensorboard"

    def __init__(self, root: Path, meta: TrialMeta, *, fresh: bool):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from torch.utils.tensorboard import SummaryWriter

        self.meta, self.folder = meta, root / meta.study / meta.run_name
        self.last: dict[str, int] = {}  # tag -> the last step it holds
        self.held: set[str] = set()  # image, text and hparams tags already written
        if fresh:  # a trial that starts over (first attempt, or --rerun) starts an empty run
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.folder.exists():
            acc = EventAccumulator(str(self.folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
            acc.Reload()
            tags = acc.Tags()
            self.last = {t: max(e.step for e in acc.Scalars(t)) for t in tags["scalars"]}
            self.held = set(tags["images"]) | set(tags["tensors"])
            try:
                self.held |= set(acc.PluginTagToContent("hparams"))
            except KeyError:  # none written yet
                pass
        self.writer = SummaryWriter(log_dir=str(self.folder), flush_secs=10)
        if "trial/text_summary" not in self.held:
            lines = [f"{k}: `{v}`" for k, v in meta.tags.items()]
            self.writer.add_text("trial", "  \n".join(lines), 0)
            self.writer.add_text("spec", "\n".join(f"    {k} = {v!r}" for k, v in meta.params.items()), 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if step > self.last.get(key, -1):
                self.writer.add_scalar(key, value, step)
                self.last[key] = step

    def finish(self, status: str, results: dict[str, float], recon: Path | None) -> None:
        """A trial's end: its results (step 0) and, once, the hparams record (axes vs results) and the figure."""
        from torch.utils.tensorboard.summary import hparams

        self.scalars(0, results)
        if recon is not None and recon.exists() and "recon" not in self.held:
            import numpy as np
            from PIL import Image

            self.writer.add_image("recon", np.asarray(Image.open(recon).convert("RGB")), 0, dataformats="HWC")
        if status == "done" and "_hparams_/session_start_info" not in self.held:
            axes = {k: _plain(v) for k, v in {**self.meta.axes, "seed": self.meta.seed}.items()}
            _, start, end = hparams(axes, {k: v for k, v in results.items()})  # the experiment: from every run's
            file_writer = self.writer._get_file_writer()  # start info, so runs of all studies share one table
            file_writer.add_summary(start)  # (torch's add_hparams writes them so, in a folder of its own)
            file_writer.add_summary(end)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowRun:
    """One trial's MLflow run in the experiment named after its study; ``run_id`` continues an earlier run."""

    name = "mlflow"

    def __init__(self, uri: str, artifact_root: Path | None, meta: TrialMeta, *, run_id: str | None):
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating the store) would cut into
        logging.getLogger("alembic").setLevel(logging.WARNING)  # the progress display

        self.client = client = MlflowClient(tracking_uri=uri)
        self.last: dict[str, int] = {}
        exp = client.get_experiment_by_name(meta.study)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = client.create_experiment(meta.study, artifact_location=(
                    (artifact_root / meta.study).resolve().as_uri() if artifact_root is not None else None))
            except MlflowException:  # another process created it first
                exp = client.get_experiment_by_name(meta.study)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        run = None
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                run = None  # recorded in another tracking store, or deleted: a new run
            if run is not None and (run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active"):
                run = None
        if run is None:
            run = client.create_run(exp_id, run_name=meta.run_name)
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            self.last = {k: max(m.step for m in client.get_metric_history(run.info.run_id, k))
                         for k in run.data.metrics}
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in meta.params.items() if k not in run.data.params]
        tags = [RunTag(k, v) for k, v in {**meta.tags, "axes": str(meta.axes)}.items()]
        for i in range(0, max(len(params), 1), 100):  # log_batch takes at most 100 params
            client.log_batch(self.run_id, params=params[i:i + 100], tags=tags if i == 0 else [])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        new = [Metric(k, float(v), stamp, step) for k, v in values.items() if step > self.last.get(k, -1)]
        if new:
            self.client.log_batch(self.run_id, metrics=new)
            self.last.update({m.key: step for m in new})

    def finish(self, status: str, results: dict[str, float], recon: Path | None) -> None:
        self.scalars(0, results)
        if recon is not None and recon.exists() and not self.client.list_artifacts(self.run_id, "recon"):
            self.client.log_artifact(self.run_id, str(recon), "recon")
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))

    def close(self) -> None:
        pass
