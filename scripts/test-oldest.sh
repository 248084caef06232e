#!/usr/bin/env bash
# Install the oldest transformers that pyproject.toml allows (or the version given as $1) into a separate venv
# (.venv-oldest) beside the library and its `cli` extra, and run the core tests there (no embedded model, no
# bench extra). Used by `make test-oldest`; needs no CI job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.11}
VENV=${VENV:-.venv-oldest}
floor=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
version=${1:-$floor}
test -n "$version" || { echo "no transformers floor found in pyproject.toml" >&2; exit 2; }
test -d "$VENV" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[cli]' "transformers==$version" 'pytest>=8' 'pytest-xdist>=3.5' 'hypothesis>=6.100,<7'
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -m "not model" -p no:cacheprovider tests/core tests/policies tests/codecs tests/reshape \
  --ignore=tests/codecs/test_hf_quant.py "${@:2}"
