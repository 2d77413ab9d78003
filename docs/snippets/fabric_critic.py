"""A WGAN loop, one batch per iteration: the critic steps on every batch, the
generator on every fifth. The loop ends HPSGD's iterations itself
(iteration_end="manual"), so that sync_every counts batches."""

import lightning as L
import torch
from torch import nn

from lightning_hpsgd.fabric import HPSGDStrategy

N_CRITIC = 5


def main() -> None:
    fabric = L.Fabric(
        accelerator="cpu",
        devices=2,
        strategy=HPSGDStrategy(sync_every=4, iteration_end="manual"),
    )
    fabric.launch()
    fabric.seed_everything(fabric.global_rank)  # each rank draws its own batches
    generator = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    critic = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    generator, opt_generator = fabric.setup(
        generator, torch.optim.RMSprop(generator.parameters(), lr=5e-5)
    )
    critic, opt_critic = fabric.setup(
        critic, torch.optim.RMSprop(critic.parameters(), lr=5e-5)
    )

    for batch in range(40):
        real = torch.randn(64, 2) * 0.5 + 2.0
        fake = generator(torch.randn(64, 8)).detach()
        critic_loss = critic(fake).mean() - critic(real).mean()
        opt_critic.zero_grad()
        fabric.backward(critic_loss)
        opt_critic.step()
        if batch % N_CRITIC == N_CRITIC - 1:
            generator_loss = -critic(generator(torch.randn(64, 8))).mean()
            opt_generator.zero_grad()
            fabric.backward(generator_loss)
            opt_generator.step()
        # On every rank, after the batch's last step: one step of the engine.
        fabric.strategy.end_iteration()

    fabric.strategy.flush()
    fabric.print(
        f"{fabric.strategy.steps} iterations, {fabric.strategy.stats.rounds} rounds"
    )


if __name__ == "__main__":
    main()
