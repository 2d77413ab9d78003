"""DDP with a communication hook: PowerSGD (rank 1, plain all-reduce
for the first 10 % of the steps), or bf16 compression.
Lightning registers the hooks on CUDA devices only."""

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import (
    default_hooks,
    powerSGD_hook,
)

max_steps = 10_000
powersgd = DDPStrategy(
    ddp_comm_state=powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=1,
        start_powerSGD_iter=max_steps // 10,
    ),
    ddp_comm_hook=powerSGD_hook.powerSGD_hook,
)
bf16 = DDPStrategy(ddp_comm_hook=default_hooks.bf16_compress_hook)

# on your GPU nodes: devices and num_nodes as for any DDP run
trainer = L.Trainer(strategy=powersgd, max_steps=max_steps)  # or bf16
