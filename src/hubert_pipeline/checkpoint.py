"""Training checkpoints: where they are, whether they belong to this run, resuming from them and saving them.

`OUT_DIR/step_XXXXXXXX.pt` holds model, optimizer, scheduler, scaler, the position in the data order (step, epoch,
steps into the epoch), the run's shape (processes x micro-batches), its fingerprint and the digests of the training
code that wrote it (`sources.training_code`); it is written atomically and read back with
`torch.load(weights_only=True)` (no pickle). A `Checkpointer` does it for one run, on every rank:

    checkpointer = Checkpointer(out_dir, fingerprint=..., rank=..., world_size=..., meta=..., max_steps=...)
    checkpointer.init_state()                                 # folder ready, another configuration's run removed;
                                                              # a run of other code or past max_steps: OtherRunError
    state = checkpointer.load_existing_run(model, opt, device, accumulate=...) or TrainState()
    checkpointer.save(model, opt, state)                      # every save_interval steps, and at the end
"""

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import distributed as dist

from hubert_pipeline.sources import describe_changes

if TYPE_CHECKING:
    from hubert_pipeline.params import TrainParams
    from hubert_pipeline.step import Optimization

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, by step."""
    folder = Path(out_dir)
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def fingerprint(manifest: str | Path, num_classes: int, model_cfg: Any, cfg: "TrainParams") -> str:
    """What makes a checkpoint resumable: same units, classes, model and trajectory settings.

    Left out: max_steps (a run can be extended), intervals, workers, init_from (used only at step 0) and
    resume_other_code. The training code is not in it: a run of other code is an error, not another run to replace.
    """
    digest = hashlib.sha256()
    with Path(manifest).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    ignored = {"max_steps", "save_interval", "log_interval", "num_workers", "init_from", "compile", "processes",
               "accumulate", "resume_other_code"}  # fmt: skip  # processes x accumulate: checked on resume
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    key = json.dumps([digest.hexdigest(), num_classes, model_cfg.to_dict(), settings], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclasses.dataclass
class TrainState:
    """Where a run is: optimizer steps done, and the position in the data order."""

    step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0


class OtherRunError(ValueError):
    """The checkpoint folder holds a run of this configuration that this one must not resume; nothing is removed."""


class Checkpointer:
    """The checkpoints of one run in `out_dir`, on every rank: rank 0 writes, every rank waits for it (barrier).

    A run in `out_dir` with this run's fingerprint is resumed if it is not past `max_steps` and the training code
    that wrote it is this one (`meta["code"]`), or `resume_other_code` says to resume it anyway (with a warning).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        fingerprint: str,
        rank: int,
        world_size: int,
        meta: dict[str, Any],
        max_steps: int,
        resume_other_code: bool = False,
    ) -> None:
        self.out_dir, self.fingerprint = Path(out_dir), fingerprint
        self.rank, self.world_size = rank, world_size
        self.meta = meta  # saved with every checkpoint: num_classes, model_config, accumulate, code
        self.max_steps, self.resume_other_code = max_steps, resume_other_code
        self.last_path: Path | None = None  # the newest checkpoint of this run, once there is one

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def init_state(self) -> None:
        """The folder, without the partial file of a killed save nor the checkpoints of another configuration.

        Another experiment's checkpoints (other units, k, model or settings), kept by DVC's `persist`, are in DVC's
        cache already: they are removed rather than resumed from.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            for stale in self.out_dir.glob(".step_*.tmp"):  # a checkpoint being written when the last run was killed
                stale.unlink()
        checkpoints = list_checkpoints(self.out_dir)
        if not checkpoints:
            return
        saved = torch.load(checkpoints[-1][1], map_location="cpu", weights_only=True, mmap=True)
        if saved.get("fingerprint") == self.fingerprint:
            self._check_resumable(*checkpoints[-1], saved.get("code"))
            self.last_path = checkpoints[-1][1]
            return
        logger.warning(
            "%s holds checkpoints of another configuration (fingerprint %s, this run %s): starting afresh",
            self.out_dir, saved.get("fingerprint"), self.fingerprint,
        )  # fmt: skip
        if self.rank == 0:
            for _, path in checkpoints:
                path.unlink()
        self._barrier()

    def _check_resumable(self, step: int, path: Path, code: dict[str, str] | None) -> None:
        """Raises OtherRunError for a run past max_steps (its later checkpoints would pass for this run's) or one
        of other training code (a resumed run would mix two codes), unless resume_other_code allows the latter."""
        if step > self.max_steps:
            raise OtherRunError(
                f"{self.out_dir} holds a run trained to step {step}, beyond max_steps {self.max_steps}: remove the "
                f"folder to train {self.max_steps} steps afresh (a run DVC committed stays in its cache)"
            )
        if code == self.meta.get("code"):
            return
        message = f"{path} was written by other training code ({describe_changes(code, self.meta.get('code', {}))})"
        if self.resume_other_code:
            logger.warning("%s: resumed all the same (resume_other_code)", message)
            return
        raise OtherRunError(
            f"{message}; resuming it would mix two codes in one run. Remove {self.out_dir} to train afresh (a run "
            "DVC committed stays in its cache), or set resume_other_code: true to resume it"
        )

    def load_existing_run(
        self, model: torch.nn.Module, opt: "Optimization", device: torch.device, *, accumulate: int
    ) -> TrainState | None:
        """Model, optimizer, schedule and scaler loaded from this run's last checkpoint; None when there is none."""
        if self.last_path is None:
            return None
        state = torch.load(self.last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.scheduler.load_state_dict(state["scheduler"])
        opt.scaler.load_state_dict(state["scaler"])
        if state["world_size"] * state["accumulate"] != self.world_size * accumulate:
            raise ValueError(
                f"{self.last_path}: saved with {state['world_size']} process(es) x {state['accumulate']} micro-batches "
                f"per step; resuming with {self.world_size} x {accumulate} would change the batches of every step"
            )
        train_state = TrainState(int(state["step"]), int(state["epoch"]), int(state["steps_in_epoch"]))
        logger.info("resuming from %s (step %d, epoch %d)", self.last_path, train_state.step, train_state.epoch)
        return train_state

    def save(self, model: torch.nn.Module, opt: "Optimization", state: TrainState) -> Path:
        """The checkpoint of `state.step`, written atomically by rank 0; every rank returns once it is complete."""
        path = checkpoint_path(self.out_dir, state.step)
        if self.rank == 0:
            from hubert_pipeline.io import atomic_path

            payload = {
                "model": model.state_dict(),
                "optimizer": opt.optimizer.state_dict(),
                "scheduler": opt.scheduler.state_dict(),
                "scaler": opt.scaler.state_dict(),
                **dataclasses.asdict(state),
                "world_size": self.world_size,
                **self.meta,
                "fingerprint": self.fingerprint,
            }
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
            logger.info("saved %s", path)
        self._barrier()
        self.last_path = path
        return path

    def save_final(self, model: torch.nn.Module, opt: "Optimization", state: TrainState) -> Path:
        """The checkpoint of `state.step` unless it is saved already (a stop between two save intervals)."""
        if self.last_path == checkpoint_path(self.out_dir, state.step):
            return self.last_path
        return self.save(model, opt, state)
