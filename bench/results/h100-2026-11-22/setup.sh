# sourced: install carried wheels into /tmp/site once per machine, report the environment
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ ! -f /tmp/site/.done ]; then W=$(ls -d .whlA .whl 2>/dev/null | head -1);
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import torch,transformers,accelerate,datasets;print('torch',torch.__version__,'tf',transformers.__version__,'acc',accelerate.__version__,'ds',datasets.__version__,torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
