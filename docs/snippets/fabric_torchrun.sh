# On every node. HEAD: the first node's address; NODE_RANK: 0 on the first
# node, 1 on the second; DEVICES: GPUs (or CPU processes) per node.
torchrun --nnodes=2 --nproc-per-node="$DEVICES" --node-rank="$NODE_RANK" \
    --master-addr="$HEAD" --master-port="${PORT:-29500}" \
    fabric_loop.py --accelerator "${ACCELERATOR:-cuda}" \
    --num-nodes 2 --devices "$DEVICES"
