"""Fixtures shared by the one-process tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture
def one_rank_group(tmp_path):
    """The default process group over this one process (gloo, a file store: no port), destroyed after the test."""
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# The longest tests (30 s to 5 minutes each under the suite), started first: pytest-xdist hands tests out in
# collection order, so one of these collected last would run alone at the end and set the suite's wall time. The
# Makefile's --maxschedchunk 2 hands them out two at a time (by default the first worker would get a quarter of
# its share in one consecutive block: all of these).
LONGEST_FIRST = (
    "tests/test_bench.py::test_quick_run_reports_every_strategy",
    "tests/test_cli.py::test_demo_reaches_the_mnist1d_paper_accuracy",
    "tests/test_flow.py::test_the_quick_start_flow",
    "tests/test_multinode_docs.py::test_a_worker_killed_under_torchrun",
    "tests/test_docs.py::test_fabric_loop_on_two_nodes",
    "tests/test_bench.py::test_convergence_quick_run",
    "tests/test_multinode_docs.py::test_preempted_slurm_job_resumes_exactly",
    "tests/test_launch_modes.py::",
    "tests/test_bench.py::test_gpu_mode_reports_every_mode_on_cpu",
    "tests/test_multinode_docs.py::",
    "tests/test_cli.py::test_every_hpsgd_recipe_runs_fast_dev_run_on_two_processes",
    "tests/test_large_h.py::",
    "tests/test_bench.py::test_ddp_with_a_comm_hook",
    "tests/test_extras.py::",
    "tests/test_monitor.py::test_plot_command_help",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        found = [i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)]
        return found[0] if found else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
