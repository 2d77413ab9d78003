# The MNIST-1D recipe with HPSGD on 2 CPU processes, a round every 2 steps,
# 2 epochs:
hpsgd fit --config recipes/mnist1d.yaml \
    --trainer.strategy.sync_every 2 --trainer.max_epochs 2
# Its test accuracy, on the flushed model:
hpsgd test --config recipes/mnist1d.yaml \
    --ckpt_path lightning_logs/mnist1d_hpsgd/version_0/checkpoints/last.ckpt
