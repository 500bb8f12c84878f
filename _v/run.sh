python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl2/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 NCCL_NVLS_ENABLE=0
mkdir -p $OUT/r
