#!/usr/bin/env bash
# The lowest transformers pyproject.toml allows (5.17: the GPU machine's), tested: an overlay venv holding
# only that transformers (and the huggingface-hub it needs), over .venv's packages, runs the engine's tiny-gpt2
# tests. transformers renamed the forward's `past_key_values` to `cache` after 5.17; the engine passes
# whichever the installed one declares (app/engine/model_runner.py: cache_keyword).
set -euo pipefail
cd "$(dirname "$0")/.."
LOWEST=5.17.0
OVERLAY=${TMPDIR:-/tmp}/textgen-transformers-$LOWEST
if [ ! -x "$OVERLAY/bin/python" ]; then
    python3 -m venv "$OVERLAY"
    "$OVERLAY/bin/pip" install --quiet --no-deps "transformers==$LOWEST" "huggingface-hub==1.33.0"
fi
SITE=$("$OVERLAY/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" >"$SITE/zz-textgen-venv.pth"
"$OVERLAY/bin/python" -c "import transformers, sys; assert transformers.__version__ == '$LOWEST', transformers.__version__; print('== transformers', transformers.__version__)"
"$OVERLAY/bin/python" -m pytest -q -p no:cacheprovider -m "not smollm" tests/engine/test_parity.py \
    tests/models/layers/test_decode_step.py tests/engine/test_kv_cache.py tests/engine/test_prefix_cache.py \
    tests/engine/test_chunked_prefill.py tests/engine/test_sliding_window.py
