source .gpu/setup.sh
date -u
timeout 500 python3 -m convert.bench_decode --synthetic llama-1b --device cuda --dtype bfloat16 \
  --batch 1 64 --context 2048 --static-cache compile --repeats 3 --out $OUT/decode-static 2>&1 | grep -v Warning | tee $OUT/decode-static.log
echo rc=$?; date -u
