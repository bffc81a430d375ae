source .gpu/setup.sh
timeout 250 python3 bench/uptrain_throughput.py --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --vocab 32000 \
  --seq-len 2048 --micro-batch 4 --grad-accum 1 --steps 30 --warmup 5 --repeats 1 --distill 2>&1 | grep -v "it/s\]" | tee $OUT/throughput-chunked.log
