"""A user's training script, as the launch-mode tests run it: ``python train_script.py OUTDIR STRATEGY DEVICES NODES``.

Each rank saves its model at the end of fit (after HPSGD's flush) to ``OUTDIR/rank{r}.pt``; with a spawn launcher,
the parent process saves what it got back to ``OUTDIR/parent.pt``.
"""

import atexit
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

AT_EXIT: dict = {}


@atexit.register  # before lightning_hpsgd registers its own: atexit runs this one after it
def _record_group_state_at_exit() -> None:
    """Record whether HPSGD destroyed its process groups at exit (the script itself destroys none)."""
    if "group" not in AT_EXIT:
        return
    try:
        dist.get_backend(AT_EXIT["group"])
        destroyed = False
    except (ValueError, RuntimeError):
        destroyed = True
    record = {"hpsgd_group_destroyed": destroyed, "default_group_destroyed": not dist.is_initialized()}
    Path(AT_EXIT["path"]).write_text(json.dumps(record))


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_hpsgd  # noqa: E402,F401  (registers "hpsgd", "hpsgd_spawn", ...)
from tests.models import Regressor, loader, make_batches  # noqa: E402


class SavingRegressor(Regressor):
    def __init__(self, outdir: str) -> None:
        super().__init__()
        self.outdir = Path(outdir)

    def on_train_end(self) -> None:
        env = self.trainer.strategy.cluster_environment
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in self.state_dict().items()},
                "environment": type(env).__name__,
                "world_size": self.trainer.world_size,
                "node_rank": self.trainer.node_rank,
                "strategy": type(self.trainer.strategy).__name__,
                "merge": self.trainer.strategy.merge,
                "rounds": self.trainer.strategy.engine.stats.rounds,
            },
            self.outdir / f"rank{self.global_rank}.pt",
        )


def main() -> None:
    outdir, strategy, devices, nodes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    module = SavingRegressor(outdir)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        num_nodes=nodes,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(make_batches(12, 8, seed=3)))
    if dist.is_initialized():
        exit_file = str(Path(outdir) / f"exit{trainer.global_rank}.json")
        AT_EXIT.update(group=trainer.strategy._groups.rounds, path=exit_file)
    if strategy in ("hpsgd_spawn", "hpsgd_fork", "hpsgd_notebook"):
        stats = trainer.strategy.stats
        torch.save(
            {
                "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "stats": None if stats is None else stats.to_dict(),
            },
            Path(outdir) / "parent.pt",
        )


if __name__ == "__main__":
    main()
