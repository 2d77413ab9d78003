# One command per process, with Lightning's plain environment variables: on
# node NODE_RANK (0 or 1), for each LOCAL_RANK from 0 to DEVICES - 1.
# MASTER_ADDR is the first node's address.
MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="${MASTER_PORT:-29500}" \
    WORLD_SIZE=$((2 * DEVICES)) NODE_RANK="$NODE_RANK" LOCAL_RANK="$LOCAL_RANK" \
    python train.py --num-nodes 2 --devices "$DEVICES"
