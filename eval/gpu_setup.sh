# Sourced by the eval/gpu_*.sh scripts on the GPU machine: unbuffered output, $OUT, the carried wheels of .whl/
# (datasets, sageattention, ...) on PYTHONPATH, this checkout installed in place, and $PYTEST: pytest with a
# per-test time limit where pytest-timeout is installed (a test that hangs fails alone instead of ending the call).
export PYTHONUNBUFFERED=1
OUT=${OUT:-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
PYTEST="python3 -m pytest -v --tb=short -p no:cacheprovider"
if python3 -c "import pytest_timeout" 2>/dev/null; then
  PYTEST="$PYTEST --timeout=${TEST_TIMEOUT:-150}"
fi
