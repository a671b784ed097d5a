#!/usr/bin/env bash
# Source at the start of a device (GPU machine) command: installs the carried wheels in .whl/
# (gguf, ml_collections) and builds the ggml-python oracle from its carried sdist, offline.
set -e
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
  .whl/ggml_python-0.0.45.tar.gz > /tmp/ggml-build.log 2>&1 || { tail -30 /tmp/ggml-build.log; exit 1; }
python3 -c "import jax, ggml, gguf, ml_collections; print('device setup:', jax.devices(), jax.__version__)"
set +e
