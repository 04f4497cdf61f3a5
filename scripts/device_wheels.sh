#!/usr/bin/env bash
# Wheels that a bare GPU machine with only torch, transformers and peft installed (Python 3.12,
# x86_64) needs to run `bench/bench_train.py --mode gpu` and `bench/bench_load.py`: our pins of the
# libraries whose versions the worker depends on, pydantic, and regex (transformers checks its version
# at import; its other checked needs, tokenizers, safetensors and huggingface_hub, are in such an image
# at versions it accepts, as is matplotlib). Downloaded into .whl/ (ignored by git, ~60 MB). On that machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
pin() { grep -E "^$1==" requirements.txt; }
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  "$(pin bitsandbytes)" "$(pin transformers)" "$(pin peft)" "$(pin pydantic)" \
  pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 regex==2026.11.15
du -sh .whl
