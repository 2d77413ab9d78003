# The MNIST-1D recipe with HPSGD on 2 CPU processes, a round every 2 steps:
hpsgd fit --config recipes/mnist1d.yaml --trainer.strategy.sync_every 2
# Its test accuracy, from the checkpoint that run just wrote:
hpsgd test --config recipes/mnist1d.yaml \
    --ckpt_path checkpoints/mnist1d_hpsgd/last.ckpt
# The DDP baseline, then both runs charted against wall time:
hpsgd fit --config recipes/mnist1d_ddp.yaml
hpsgd plot lightning_logs/mnist1d_hpsgd lightning_logs/mnist1d_ddp --out plots
