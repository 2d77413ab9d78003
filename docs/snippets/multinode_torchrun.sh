# On every node: NODE_RANK is 0 on the first node, 1 on the second;
# MASTER_ADDR is the first node's address; DEVICES is the number of GPUs
# (or CPU processes) per node.
# --hierarchy node: synchronous inside a node, HPSGD between nodes.
torchrun --nnodes=2 --node_rank="$NODE_RANK" --nproc_per_node="$DEVICES" \
    --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
    train.py --num-nodes 2 --devices "$DEVICES" --hierarchy node
