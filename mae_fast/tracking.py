"""Weights & Biases, an optional extra (pip install mae-fast[wandb]): logging.wandb_project turns it on. A W&B run
gets the TensorBoard scalars (train/*), the evaluations (eval/*), the reconstruction grids and the resolved config
with the run report. Its id is kept in the checkpoint folder, so a resumed run continues the same W&B run."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from .checkpoint import CheckpointError
from .config import Config, ConfigError, Derived, resolved
from .metrics import Snapshot

RUN_ID_FILE = "wandb-run.json"  # in checkpointing.checkpoint_dir: {"project": ..., "id": ...}


def wandb_wanted(cfg: Config) -> bool:
    return bool(cfg.logging.wandb_project) and cfg.logging.wandb_mode != "disabled"


def require_wandb(cfg: Config) -> None:
    """Before any work: a project set without wandb installed is one error line saying what to install."""
    if not wandb_wanted(cfg):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"logging.wandb_project is {cfg.logging.wandb_project!r} but wandb is not installed: "
            f"pip install 'mae-fast[wandb]' (or pip install wandb), or set logging.wandb_project to \"\""
        ) from None


def read_run_id(path: Path, project: str) -> str | None:
    """The W&B run id a previous run of this checkpoint folder left, None when it was another project's.
    A file that is not one of ours is refused (CheckpointError), naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: cannot be read as a W&B run id file ({e}); delete it to start a new W&B run"
        ) from None
    run_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(run_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", run_id):
        raise CheckpointError(f'{path}: not a W&B run id file (no valid "id"); delete it to start a new W&B run')
    return run_id if data.get("project") == project else None


def _write_run_id(path: Path, project: str, run_id: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"project": project, "id": run_id}) + "\n")
    os.replace(tmp, path)


class WandbRun:
    """The sink RunLog hands metrics, evaluations and images to (rank 0)."""

    def __init__(self, run):
        self.run = run
        run.define_metric("step")
        for prefix in ("train/*", "eval/*", "memory/*", "reconstructions"):
            run.define_metric(prefix, step_metric="step")

    @classmethod
    def start(cls, cfg: Config, derived: Derived, report: dict) -> WandbRun | None:
        """A new W&B run, or the checkpoint folder's one when this run resumes; None when W&B is off."""
        if not wandb_wanted(cfg):
            return None
        import wandb

        lg, x = cfg.logging, cfg.misc
        ck = Path(cfg.checkpointing.checkpoint_dir)
        id_file = ck / RUN_ID_FILE
        resuming = bool(x.resume) or (x.auto_resume and (ck / "latest.pt").exists())
        run_id = read_run_id(id_file, lg.wandb_project) if resuming and id_file.exists() else None
        try:
            run = wandb.init(
                project=lg.wandb_project,
                mode=lg.wandb_mode,
                name=lg.wandb_run_name or x.run_name or Path(lg.output_dir).name,
                id=run_id,
                resume="must" if run_id else None,
                config={**resolved(cfg, derived), "run_report": report},
                dir=os.environ.get("WANDB_DIR") or lg.output_dir,  # read here: wandb reads its environment once
                settings=wandb.Settings(console="off"),  # the log file has the console; the dashboard redraws
            )
        except wandb.errors.Error as e:  # not logged in, no network, no such run to resume
            raise ConfigError(
                f"logging.wandb_mode: {lg.wandb_mode}: W&B could not start the run ({e}); log in with `wandb login`, "
                f"or set logging.wandb_mode: offline (upload later with `wandb sync`)"
            ) from None
        ck.mkdir(parents=True, exist_ok=True)
        _write_run_id(id_file, lg.wandb_project, run.id)
        return cls(run)

    def metrics(self, snap: Snapshot) -> None:
        self.run.log({"step": snap.step, "epoch": snap.epoch, **snap.scalars()})

    def evaluation(self, step: int, epoch: int, scores: dict[str, float]) -> None:
        """An evaluation's scores (EvalResult.scores(): what TensorBoard gets too), as eval/KEY."""
        numbers = {f"eval/{k}": v for k, v in scores.items()}
        self.run.log({"step": step, "epoch": epoch, **numbers})

    def image(self, path: Path, step: int, caption: str) -> None:
        import wandb

        self.run.log({"step": step, "reconstructions": wandb.Image(str(path), caption=caption)})

    def close(self, failed: bool = False) -> None:
        with contextlib.suppress(Exception):  # W&B failing to finish must not hide how the run ended
            self.run.finish(exit_code=1 if failed else 0)
