"""CUDA/NCCL paths: skipped on machines without a GPU (CI has none); run them where one is present."""

from __future__ import annotations

import pytest
import torch

from tests.launch import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_cuda_nccl_precisions(tmp_path, precision):
    world = min(2, torch.cuda.device_count())
    results = run_ranks(
        "fit",
        tmp_path,
        {
            "accelerator": "gpu",
            "backend": "nccl",
            "precision": precision,
            "max_epochs": 2,
            "val": True,
            "after_fit": True,
            "sync_every": 2,
        },
        world_size=world,
    )
    for r in results:
        assert not r.result["pending_at_end"] and r.result["rounds"] > 0
        assert r.result["global_dtype"] == torch.float32
        for name, value in r.result["final"].items():
            assert torch.isfinite(value.float()).all(), name
            assert torch.equal(value, results[0].result["final"][name])


def test_cuda_engine_matches_reference(tmp_path):
    """The side-stream all-reduce path gives the same model as the reference simulation."""
    from tests.models import build_net, make_batches
    from tests.reference import simulate
    from tests.test_reference import NUM_BATCHES, assert_matches, mse, sgd

    world = min(2, torch.cuda.device_count())
    args = {"accelerator": "gpu", "backend": "nccl", "per_rank_data": True, "num_batches": NUM_BATCHES, "sync_every": 3}
    results = run_ranks("fit", tmp_path, args, world_size=world)
    batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(world)]
    reference = simulate(build_net(), sgd, batches, 3, "replica", mse)
    for r in results:
        assert_matches(r.result, reference)


SHARED = {"accelerator": "gpu", "backend": "gloo", "per_rank_data": True}


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "bf16-true"])
def test_two_ranks_share_one_gpu_through_gloo(tmp_path, precision):
    """A real peer on a one-GPU machine: two simulated nodes of one device each, both on cuda:0, gloo on CUDA
    tensors. The ranks are identical after fit, and in fp32 the run matches the reference simulation."""
    from tests.models import build_net, make_batches
    from tests.reference import simulate
    from tests.test_reference import NUM_BATCHES, assert_matches, mse, sgd

    args = {**SHARED, "precision": precision, "num_batches": NUM_BATCHES, "sync_every": 3}
    results = run_ranks("fit", tmp_path, args, world_size=2, num_nodes=2)
    for r in results:
        assert r.result["stats"]["rounds"] == NUM_BATCHES // 3 + 1 and r.result["stats"]["timed_rounds"] >= 1
        for name, value in r.result["final"].items():
            assert torch.equal(value, results[0].result["final"][name]), name
    if precision == "32-true":
        batches = [make_batches(NUM_BATCHES, 8, seed=100 + r) for r in range(2)]
        reference = simulate(build_net(), sgd, batches, 3, "replica", mse)
        for r in results:
            assert_matches(r.result, reference)


def test_grad_scaler_state_per_rank_on_a_shared_gpu(tmp_path):
    """16-mixed with Lightning's own GradScaler: each rank's scale survives a checkpoint, and the resume is exact."""
    args = {**SHARED, "precision": "16-mixed", "num_batches": 6, "max_epochs": 2, "sync_every": 2}
    first = run_ranks("fit", tmp_path / "a", {**args, "checkpoint": {"every_n_epochs": 1}}, num_nodes=2)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0-step=6.ckpt"
    saved = torch.load(ckpt, weights_only=False)["hpsgd"]["precision_states"]
    assert len(saved) == 2
    resumed = run_ranks("fit", tmp_path / "b", {**args, "resume_from": str(ckpt)}, num_nodes=2)
    for a, b in zip(first, resumed):
        assert b.result["scaler_state_at_start"]["scale"] == saved[b.rank]["scale"]
        for name, value in a.result["final"].items():
            assert torch.equal(b.result["final"][name], value), name


def test_gpu_benchmark_runs_two_ranks_on_the_gpus_here(tmp_path):
    import json
    import subprocess
    import sys

    from tests.launch import ROOT, base_env

    cmd = [sys.executable, "-m", "lightning_hpsgd.bench", "gpu", "--steps", "12", "--warmup", "4",
           "--out", str(tmp_path / "gpu.json")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    hpsgd = report["modes"]["hpsgd"]
    assert hpsgd["rounds_timed"] == 12 and hpsgd["comm_ms"] > 0.05  # events time the all-reduce, not its enqueue


def _time_rounds(rank: int, world: int, store_path: str, out: str) -> None:
    """One rank of the NCCL timing check: the engine's measured comm time per round, and the same all-reduce timed
    alone with events on the current stream (a microbenchmark)."""
    import torch.distributed as dist

    from lightning_hpsgd.engine import HPSGDEngine

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        w = torch.zeros(32 * 2**20, device="cuda")  # 128 MB: an all-reduce of milliseconds on any link
        engine = HPSGDEngine({"w": w}, sync_every=1)
        x = torch.randn(2048, 2048, device="cuda")
        for step in range(1, 9):
            w.add_(1e-3)
            for _ in range(20):  # compute for the all-reduce to hide behind
                x = torch.tanh(x @ x)
            engine.on_optimizer_step(step)
        engine.flush(9)
        stats = engine.stats
        buf = torch.ones_like(w)
        alone = []
        for _ in range(5):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dist.all_reduce(buf)
            end.record()
            end.synchronize()
            alone.append(begin.elapsed_time(end) / 1000)
        result = {"timed": stats.timed_rounds, "overlapped": stats.overlapped_rounds,
                  "comm": stats.comm_seconds / max(stats.timed_rounds, 1), "alone": sorted(alone)[2]}  # fmt: skip
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for an NCCL all-reduce that moves data")
def test_nccl_events_time_the_all_reduce_itself(tmp_path):
    """On NCCL the all-reduce runs on NCCL's own stream: the engine's events must time it there (the end event after
    the side stream waited for it), so ``comm_ms`` is about what the same all-reduce takes alone, not ~0, and every
    overlapped round is timed once the flush drained the events."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_time_rounds, args=(world, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=world)
    for rank in range(world):
        r = torch.load(tmp_path / f"out.{rank}")
        assert r["timed"] == r["overlapped"] == 7, r
        assert r["comm"] >= 0.5 * r["alone"], r  # the enqueue alone (the old events) takes microseconds
