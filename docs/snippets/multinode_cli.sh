# hpsgd fit on every node: the CLI is the module lightning_hpsgd. Same
# variables as above.
torchrun --nnodes=2 --nproc-per-node="$DEVICES" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${PORT:-29500}" \
    --rdzv-id="$JOB_ID" \
    -m lightning_hpsgd fit --config recipes/cifar10_resnet18.yaml \
    --trainer.num_nodes 2 --trainer.devices "$DEVICES"
