#!/usr/bin/env bash
# Wheels for the GPU check on a lent GPU machine, which has torch, transformers, accelerate, peft, pandas, pyarrow
# and pytest-xdist but none of these: .whl/site (what the stages need: TRL 1.16, datasets, bitsandbytes cut to its
# CPU and CUDA 13.0 libraries, DeepSpeed built without ops) and .whl/peer (TRL 1.12, the PPO peer). Python 3.12,
# x86-64. .whl/ is not committed; on the GPU machine (the device tool carries .whl, see bench/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/site/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/trl112 .whl/peer/*.whl
#   PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --python python3 --peer-site /tmp/trl112
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl/site .whl/peer
download() {
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$@"
}
download .whl/site trl==1.16.0 datasets==5.2.0 dill multiprocess hjson bitsandbytes==0.50.2
# what DeepSpeed imports that the GPU machine lacks (pydantic and its parts must come together)
download .whl/site pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection msgpack py-cpuinfo ninja einops
download .whl/peer trl==1.12.0
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl/site deepspeed==0.19.0
# bitsandbytes ships a library for every CUDA, ROCm and XPU version (43 MB): keep the CPU and CUDA 13.0 ones
"$PY" - <<'PYTHON'
import glob, zipfile, os
path = glob.glob(".whl/site/bitsandbytes-*.whl")[0]
keep = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".cut", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        name = os.path.basename(item.filename)
        if name.startswith("libbitsandbytes_") and name not in keep:
            continue
        dst.writestr(item, src.read(item.filename))
os.replace(path + ".cut", path)
PYTHON
du -sh .whl/site .whl/peer
