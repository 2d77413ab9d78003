"""What HPSGD takes from Lightning's internals (lightning_hpsgd/compat.py) is all there, and removed after fit."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Timer

from lightning_hpsgd import compat
from tests.launch import run_ranks


def trainer_with_timer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, max_time={"minutes": 5}, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, **kwargs)  # fmt: skip


def test_this_lightning_release_has_everything_hpsgd_patches():
    trainer = trainer_with_timer()
    (timer,) = [c for c in trainer.callbacks if isinstance(c, Timer)]
    absent = compat.missing(trainer, timer)
    assert not absent, "Lightning renamed what HPSGD patches; update lightning_hpsgd/compat.py:\n" + "\n".join(absent)


def test_missing_names_each_absent_attribute():
    trainer = trainer_with_timer()
    (timer,) = [c for c in trainer.callbacks if isinstance(c, Timer)]
    del timer._duration
    del trainer.fit_loop.epoch_loop._batches_that_stepped
    absent = compat.missing(trainer, timer)
    assert len(absent) == 2
    assert absent[0].startswith("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop._batches_that_stepped")
    assert absent[1].startswith("lightning.pytorch.callbacks.timer.Timer._duration (read: the time limit)")


def test_patches_are_applied_during_fit_and_removed_after(tmp_path):
    (rank,) = run_ranks("compat", tmp_path, world_size=1)  # its own process: fit leaves a process group behind
    assert rank.result["during_fit"] == {"loop": True, "signal": True, "timer": True}
    assert rank.result["after_fit"] == {"loop": False, "signal": False, "timer": False}
