source .gpu/setup.sh
date -u
timeout 520 python3 -m convert.bench_decode --synthetic llama-1b --device cuda --dtype bfloat16 \
  --batch 1 8 32 64 128 --context 512 2048 8192 --fit-context 2048 --memory-budget 70 --repeats 3 \
  --out $OUT/decode 2>&1 | tee $OUT/decode.log
echo rc=$?
date -u
