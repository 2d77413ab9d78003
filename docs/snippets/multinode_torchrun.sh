# On every node. HEAD: the first node's address; JOB_ID: any id, the same on
# every node; DEVICES: GPUs (or CPU processes) per node. A lost worker restarts
# every worker (up to 3 times), and train.py resumes from its last checkpoint.
# A new store for each restart: else a restarted rank can read a dead rank's
# address from the last attempt (pytorch/pytorch#167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
torchrun --nnodes=2 --nproc-per-node="$DEVICES" --max-restarts=3 \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${PORT:-29500}" \
    --rdzv-id="$JOB_ID" \
    train.py --num-nodes 2 --devices "$DEVICES" --hierarchy node
