"""One rank of a test run (started by :mod:`tests.launch`): ``python -m tests.worker SCENARIO OUTDIR ARGS_JSON``."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    OnExceptionCheckpoint,
    StochasticWeightAveraging,
    Timer,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import RunningStage

import lightning_hpsgd  # noqa: F401  (registers the strategy names)
from lightning_hpsgd import HPSGDStrategy
from tests.fabric_worker import scenario_fabric
from tests.models import GAN, Regressor, loader, make_batches


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Recorder(Callback):
    """Records what the tests assert: parameters at start and end of fit, and the engine's counters."""

    def __init__(self, every_step: bool = False) -> None:
        self.record: dict[str, Any] = {}
        self.every_step = every_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_step:
            self.record.setdefault("by_step", {})[trainer.global_step] = snapshot(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.setdefault("initial", snapshot(pl_module))
        self.record["start_step"] = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"] if trainer.optimizers else {}
        copied = {k: {name: torch.as_tensor(v).clone() for name, v in entry.items()} for k, entry in state.items()}
        self.record.setdefault("optimizer_state_at_start", copied)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.record.setdefault("scaler_state_at_start", dict(scaler.state_dict()))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.record.setdefault("at_validation", []).append(snapshot(pl_module))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.record.setdefault("at_checkpoint", {})[trainer.global_step] = snapshot(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["final"] = snapshot(pl_module)
        self.record["global_step"] = trainer.global_step
        engine = getattr(trainer.strategy, "engine", None)
        if engine is None:  # a baseline strategy
            return
        self.record["rounds"] = engine.stats.rounds
        self.record["stats"] = engine.stats.to_dict()
        self.record["flushes"] = engine.stats.flushes
        self.record["pending_at_end"] = engine.pending is not None
        self.record["global_dtype"] = engine.global_.dtype
        self.record["wire_dtype"] = engine.comm_dtype
        self.record["param_dtypes"] = {n: p.dtype for n, p in pl_module.named_parameters()}


class EngineAtStart(Callback):
    """The engine's state when a fit starts (after setup read any checkpoint)."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = trainer.strategy.engine
        state = engine.state_dict()
        self.record = {
            "rounds": engine.stats.rounds,
            "sync_every": engine.sync_every,
            "sync_delay": engine.sync_delay,
            "next_sync": engine.schedule.next_sync,
            "outer_momentum": state.get("outer_momentum"),
        }


class BroadcastCounter(Callback):
    """Counts the collectives on the default group (broadcasts, all-reduces) made by anyone between the start and
    the end of training. HPSGD's rounds run on a group of their own and are not counted."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.count = 0
        self.active = False
        for name in ("broadcast", "broadcast_object_list", "all_reduce"):
            original = getattr(dist, name)

            def counted(*a: Any, _original: Any = original, **k: Any) -> Any:
                group = k.get("group")
                self.count += self.active and (group is None or group is dist.group.WORLD)
                return _original(*a, **k)

            setattr(dist, name, counted)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = False


class StepClock(Callback):
    """A fake clock for the Trainer's ``Timer`` callbacks: training time advances by ``seconds_per_batch`` with each
    training batch, however fast the machine runs it, so a time limit ends fit at a batch that follows from the limit
    alone. ``attach`` replaces each Timer's ``time_elapsed`` (all that its checks, and HPSGD's, read of the clock)."""

    def __init__(self, seconds_per_batch: float) -> None:
        self.seconds_per_batch = seconds_per_batch
        self.batches = 0

    def attach(self, trainer: L.Trainer) -> None:
        trainer.callbacks.append(self)
        for timer in [c for c in trainer.callbacks if isinstance(c, Timer)]:
            timer.time_elapsed = functools.partial(self.time_elapsed, timer, timer.time_elapsed)  # type: ignore

    def time_elapsed(self, timer: Timer, real: Any, stage: str = RunningStage.TRAINING) -> float:
        if RunningStage(stage) is not RunningStage.TRAINING:
            return real(stage)  # validation and test stages keep the real clock
        return self.batches * self.seconds_per_batch + timer._offset  # _offset: time restored from a checkpoint

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.batches += 1


def env_rank() -> int:
    """The global rank that tests.launch assigned through Lightning's plain environment variables."""
    devices = int(os.environ.get("HPSGD_TEST_DEVICES", 1))
    return int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))


def loggers(args: dict[str, Any], outdir: Path) -> list[Any] | bool:
    """The loggers a test asked for: CSV under OUTDIR/logs/csv, TensorBoard under OUTDIR/logs/tb, W&B under
    OUTDIR/logs/wandb (offline unless an API key is configured, as the ``hpsgd`` command decides)."""
    chosen: list[Any] = []
    if args.get("wandb_logger"):
        from lightning_hpsgd.wandb import offline_unless_logged_in

        offline_unless_logged_in()
        chosen.append(WandbLogger(save_dir=outdir / "logs", project="tests", group="regressor", job_type="hpsgd"))
    if args.get("csv_logger"):
        chosen.append(CSVLogger(outdir / "logs", name="csv"))
    if args.get("tb_logger"):
        chosen.append(TensorBoardLogger(outdir / "logs", name="tb"))
    return chosen or False


def cpu_fp16_with_grad_scaler() -> Any:
    """fp16 autocast with a GradScaler on CPU, as 16-mixed on a GPU. Each rank's scaler state must travel through
    checkpoints per rank: ranks skip steps on overflow at different times, so their scales differ. Here each rank
    starts from its own scale so that they differ for certain."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (8 + env_rank()), growth_interval=2)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def build_trainer(args: dict[str, Any], outdir: Path, callbacks: list[Callback]) -> L.Trainer:
    options = {"sync_every": args.get("sync_every", 1), "merge": args.get("merge", "replica")}
    strategy = HPSGDStrategy(
        comm_dtype=args.get("comm_dtype"),
        timeout=timedelta(seconds=args.get("timeout_s", 60)),
        process_group_backend=args.get("backend"),
        monitor=args.get("monitor", True),
        **{**options, **args.get("strategy_args", {})},
    )
    if args.get("on_exception_checkpoint"):
        callbacks.append(OnExceptionCheckpoint(outdir / "on_exception"))
    if args.get("timer_epoch_s"):
        callbacks.append(Timer(timedelta(seconds=args["timer_epoch_s"]), interval="epoch"))
    if args.get("swa"):
        callbacks.append(StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1))
    ckpt = args.get("checkpoint")
    if ckpt:
        callbacks.append(
            ModelCheckpoint(
                dirpath=outdir / ckpt.get("dir", "ckpt"),
                filename="{epoch}-{step}",
                save_top_k=-1,
                every_n_epochs=ckpt.get("every_n_epochs"),
                every_n_train_steps=ckpt.get("every_n_train_steps"),
                save_on_train_epoch_end=True,
            )
        )
    trainer = L.Trainer(
        accelerator=args.get("accelerator", "cpu"),
        devices=int(os.environ.get("HPSGD_TEST_DEVICES", 1)),
        num_nodes=int(os.environ.get("HPSGD_TEST_NODES", 1)),
        strategy=args.get("strategy", strategy),
        precision=None if args.get("cpu_grad_scaler") else args.get("precision", "32-true"),
        plugins=[cpu_fp16_with_grad_scaler()] if args.get("cpu_grad_scaler") else None,
        max_epochs=args.get("max_epochs", 1),
        max_steps=args.get("max_steps", -1),
        max_time={"seconds": args["max_time_s"]} if args.get("max_time_s") else None,
        accumulate_grad_batches=args.get("accumulate", 1),
        gradient_clip_val=args.get("clip"),
        use_distributed_sampler=not args.get("per_rank_data", False),
        limit_val_batches=args.get("limit_val_batches", 1.0),
        num_sanity_val_steps=0,
        logger=loggers(args, outdir),
        log_every_n_steps=args.get("log_every_n_steps", 50),
        enable_checkpointing=bool(ckpt or args.get("on_exception_checkpoint")),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
    )
    if args.get("timer_s_per_batch"):  # time limits counted in batches: the same stop on a fast or a loaded machine
        StepClock(args["timer_s_per_batch"]).attach(trainer)
    return trainer


def train_data(args: dict[str, Any], rank: int, world_size: int):
    n, bs = args.get("num_batches", 6), args.get("batch_size", 8)
    stateful = args.get("stateful_loader", False)
    if args.get("shuffle"):
        return shuffled_loader(make_batches(n * world_size, bs, seed=7), args["shuffle"], rank, world_size)
    if args.get("per_rank_data"):
        seed = 100 if args.get("same_data") else 100 + rank
        return loader(make_batches(n, bs, seed), stateful)
    return loader(make_batches(n * world_size, bs, seed=7), stateful)


def shuffled_loader(batches: list[Any], how: str, rank: int, world_size: int) -> Any:
    """A ``StatefulDataLoader`` over the samples of ``batches`` that shuffles them, each epoch anew.

    ``how``: ``"loader"``, ``StatefulDataLoader(shuffle=True)``, whose sampler Lightning wraps in a
    ``DistributedSamplerWrapper``; ``"sampler"``, torchdata's ``StatefulDistributedSampler`` (the Multi-node page's way,
    which Lightning leaves in place).
    """
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    dataset = torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    batch_size = batches[0][0].shape[0]
    if how == "loader":
        torch.manual_seed(0)  # the seed of the loader's own generator: the same on every rank
        return StatefulDataLoader(dataset, batch_size=batch_size, shuffle=True)
    sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler)


def perturb_by_rank(module: torch.nn.Module, rank: int) -> None:
    """Make every floating-point tensor (weights, frozen ones, buffers) differ across ranks before fit."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.add_(0.25 * rank)


def scenario_fit(outdir: Path, args: dict[str, Any]) -> dict[str, Any]:
    rank, world_size = env_rank(), int(os.environ.get("WORLD_SIZE", 1))
    if args.get("model") == "gan":
        module: L.LightningModule = GAN(**args.get("model_args", {}))
    else:
        model_args = dict(args.get("model_args", {}))
        if "hidden_on_rank1" in args and rank == 1:
            model_args["hidden"] = args["hidden_on_rank1"]
        module = Regressor(**model_args)
    if args.get("wrap_ddp"):
        module.setup = lambda stage: setattr(  # type: ignore[method-assign]
            module, "net", torch.nn.parallel.DistributedDataParallel(module.net)
        )
    if args.get("rank_init"):
        perturb_by_rank(module, rank)
    pre_fit = snapshot(module)
    recorder = Recorder(every_step=args.get("record_every_step", False))
    broadcasts = BroadcastCounter() if args.get("count_broadcasts") else None
    engine_at_start = EngineAtStart() if args.get("record_engine_at_start") else None
    extra = [c for c in (broadcasts, engine_at_start) if c is not None]
    trainer = build_trainer(args, outdir, [recorder, *extra])
    val = loader(make_batches(2, 8, seed=99)) if args.get("val") else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, train_data(args, rank, world_size), val, ckpt_path=args.get("resume_from"))
        finally:
            for w in caught:  # recorded warnings are not printed; show them (tests read stderr on failure)
                print(f"warning: {w.message}", file=sys.stderr)
    out = dict(recorder.record)
    out["pre_fit"] = pre_fit
    stats = getattr(trainer.strategy, "stats", None)
    out["stats_after_fit"] = None if stats is None else stats.to_dict()
    if args.get("refit"):
        # A second fit on the same Trainer, from weights the user set by hand, with nothing to learn (lr = 0).
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(0.5)
        module.hparams.lr = 0.0
        trainer.fit_loop.max_epochs += 1
        trainer.fit(module, train_data(args, rank, world_size), val)
        out["refit_final"] = snapshot(module)
    if engine_at_start is not None:
        out["engine_at_start"] = engine_at_start.record
    if args.get("validate_then_refit"):
        # `validate(ckpt_path=...)` reads a checkpoint; a later fit without one must start a fresh engine.
        ckpt = sorted((outdir / "ckpt").glob("*.ckpt"))[-1]
        trainer.validate(module, val, ckpt_path=str(ckpt), verbose=False)
        fresh = Regressor(**dict(args.get("model_args", {})))
        at_start = EngineAtStart()
        trainer.callbacks.append(at_start)
        trainer.fit_loop.max_epochs += 1
        trainer.fit(fresh, train_data(args, rank, world_size), val)
        out["refit_engine_at_start"] = at_start.record
    if broadcasts is not None:
        out["broadcasts_during_training"] = broadcasts.count
    out["warnings"] = [str(w.message) for w in caught]
    if args.get("shuffle"):  # the sampler the loader used in fit, after Lightning replaced it or left it in place
        sampler = trainer.train_dataloader.batch_sampler.sampler
        out["train_sampler"] = (type(sampler).__name__, sampler.shuffle)
    out["rank"] = trainer.global_rank
    out["world_size"] = trainer.world_size
    out["precision"] = trainer.precision
    out["losses"] = getattr(module, "losses", [])
    out["callback_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if args.get("save_after_fit"):
        trainer.save_checkpoint(outdir / "after_fit.ckpt")
    if args.get("after_fit"):
        test_data = loader(make_batches(2, 8, seed=98))
        out["test"] = trainer.test(module, test_data, verbose=False)
        out["predict"] = trainer.predict(module, loader(make_batches(1, 4, seed=97)))
        out["after_test_params"] = snapshot(module)
        module.eval()
        with torch.no_grad():  # each rank's own output on the same inputs: no metric synchronisation involved
            out["eval_output"] = module(make_batches(1, 8, seed=96)[0][0].to(module.device, module.dtype)).cpu()
    return out


def scenario_engine(outdir: Path, args: dict[str, Any]) -> dict[str, Any]:
    """The engine alone on a gloo group: known per-rank changes applied between sync points (no framework)."""
    import torch.distributed as dist

    from lightning_hpsgd import HPSGDEngine

    dist.init_process_group(
        "gloo",
        rank=env_rank(),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=args.get("timeout_s", 60)),
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + rank)  # different on purpose: setup must broadcast rank 0's values
    dtype = getattr(torch, args.get("dtype", "float32"))
    rows = args.get("rows", 5)  # a larger first tensor makes a round's all-reduce longer
    replica = [torch.randn(rows, 3, dtype=dtype), torch.randn(7, dtype=dtype), torch.randn(2, dtype=torch.float64)]
    counter = torch.tensor([3], dtype=torch.int64)
    nodes = None
    if args.get("hierarchy"):  # node-mates make the same changes, as the gradient all-reduce inside a node makes them
        from lightning_hpsgd.process_groups import node_groups

        nodes = node_groups(int(os.environ["NODE_RANK"]), "gloo", timedelta(seconds=args.get("timeout_s", 60)))
    tensors = {"w": replica[0], "b": replica[1], "fp64_buffer": replica[2], "counter": counter}
    frozen = torch.zeros(4)  # a target network: frozen, changed outside the optimizer (promoted at a flush)
    averaged = None
    if args.get("frozen_tensor"):
        tensors["t"], averaged = frozen, ["w", "b", "fp64_buffer"]
    engine = HPSGDEngine(
        tensors,
        averaged,
        group=dist.new_group(),
        **{
            "sync_every": args.get("sync_every", 1),
            "merge": args.get("merge", "replica"),
            "comm_dtype": args.get("comm_dtype"),
            "defer_checks": args.get("defer_checks", False),
            "broadcast": args.get("broadcast", True),
            "nodes": nodes,
            **args.get("engine_args", {}),
        },
    )
    step_sleep_s = args.get("step_sleep_s", [0.0] * world_size)[rank]  # "compute" time per step, per rank
    out: dict[str, Any] = {"rank": rank, "initial": [t.clone() for t in replica], "counter": int(counter)}
    totals = [torch.zeros_like(t, dtype=torch.float64) for t in replica]
    gen = torch.Generator().manual_seed(int(os.environ["NODE_RANK"]) if nodes is not None else rank)
    history = []
    sync_steps, sync_every, proposals, sync_delays = [], [], [], []
    step = 0
    try:
        for step in range(1, args.get("steps", 7) + 1):
            for t, total in zip(replica, totals):
                change = torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.01
                if args.get("nan_at_step") == step and rank == 1 and t is replica[1]:
                    change[2] = float("nan")
                if args.get("big_change_at_step") == step and t is replica[0]:
                    change[1, 1] = args.get("big", 7e4)  # 7e4: finite on every rank, but the sum overflows fp16
                before = t.double().clone()
                t.add_(change.to(t.dtype))
                total.add_(t.double() - before)  # what the rank really changed, after its own rounding
            if args.get("stop_from_rank") == rank and step == 2:
                engine.request_stop()
            if args.get("extra_step_on_rank1") and rank == 1 and step == 2:
                engine.on_optimizer_step(99)
            if step_sleep_s:
                time.sleep(step_sleep_s)
            if args.get("change_frozen_from") is not None and step >= args["change_frozen_from"]:
                frozen.add_(rank + 1.0)
            if engine.on_optimizer_step(step):
                sync_steps.append(step)
                sync_every.append(engine.sync_every)
                # What this rank's round just launched carries in the side channel: its step and comm times.
                proposals.append(
                    (engine.schedule.step_seconds, engine.schedule.comm_seconds, engine.schedule.wait_seconds)
                )
                sync_delays.append(engine.sync_delay)
            history.append([t.clone() for t in replica])
            if args.get("mid_flush_at") == step:
                engine.flush(step)
            if args.get("reenter_at_step") == step:
                with engine.guard("sync point"):  # as if a signal handler interrupted a sync point
                    engine.flush(step)
        engine.flush(step)
        for _ in range(args.get("extra_flushes", 0)):  # flushes with no step in between (validation, checkpoint)
            out.setdefault("before_extra_flushes", [t.clone() for t in replica])
            engine.flush(step)
    except Exception as err:  # the test asserts the message; every rank must raise the same error
        out["error"] = f"{type(err).__name__}: {err}"
    out.update(
        final=[t.clone() for t in replica],
        frozen=frozen.clone(),
        totals=totals,
        history=history,
        global_=engine.global_.clone(),
        rounds=engine.stats.rounds,
        pending=engine.pending is not None,
        global_dtype=engine.global_.dtype,
        sync_steps=sync_steps,
        sync_every=sync_every,
        proposals=proposals,
        sync_delays=sync_delays,
        sync_every_at_end=engine.sync_every,
        state=engine.state_dict(),
        stats=engine.stats.to_dict(),
        stop_requested=int(engine.stop_requested),
    )
    return out


def scenario_compat(outdir: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Which of Lightning's objects carry HPSGD's patches during fit (seen from a callback) and after it."""

    def patched(trainer: L.Trainer) -> dict[str, bool]:
        timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
        return {
            "loop": "_broadcast_sigterm_tensor" in vars(trainer.fit_loop.epoch_loop),
            "signal": "_sigterm_notifier_fn" in vars(trainer._signal_connector),
            "timer": any("_check_time_remaining" in vars(t) for t in timers),
        }

    out: dict[str, Any] = {"rank": 0}

    class Probe(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *rest: Any) -> None:
            out["during_fit"] = patched(trainer)

    trainer = L.Trainer(strategy=HPSGDStrategy(), accelerator="cpu", devices=1, max_epochs=1,
                        max_time={"minutes": 5}, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Probe()])  # fmt: skip
    trainer.fit(Regressor(), loader(make_batches(2, 4, seed=1)))
    out["after_fit"] = patched(trainer)
    return out


def scenario_script(outdir: Path, args: dict[str, Any]) -> dict[str, Any]:
    """A documentation script run as ``python script.py`` runs it, in a rank whose process this test started (its
    ``fabric.launch()`` then starts nothing)."""
    import runpy

    runpy.run_path(args["path"], run_name="__main__")
    devices = int(os.environ["HPSGD_TEST_DEVICES"])
    return {"rank": int(os.environ["NODE_RANK"]) * devices + int(os.environ["LOCAL_RANK"])}


SCENARIOS = {"fit": scenario_fit, "engine": scenario_engine, "compat": scenario_compat, "fabric": scenario_fabric,
             "script": scenario_script}  # fmt: skip


def main() -> None:
    scenario, outdir, args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(1)
    result = SCENARIOS[scenario](outdir, args)
    torch.save(result, outdir / f"rank{result['rank']}.pt")
    if torch.distributed.is_initialized():
        # As PyTorch asks of every script: otherwise gloo may free finished work during interpreter shutdown and
        # abort the process. This destroys every group, the strategy's own ones too.
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
