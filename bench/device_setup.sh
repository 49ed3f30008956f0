# Sourced at the start of a command on the lent GPU machine (device tool; carry [".whl", ".venv/share/haloquant"]):
# installs the wheels carried in .whl (pydantic, transformers 4.57.6, …, llama-cpp-python built on the CPU
# machine) into /tmp/site, and points gguf-py and llama.cpp's converter at the carried copy. llama-cpp-python
# is dropped again if its library does not run on that host's CPU (it was built for this one's).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
# The gguf module is the carried gguf-py (llama.cpp's converter needs its newer names, e.g. LazyChunkedTensor, which
# PyPI's gguf 0.19.0 lacks); only the wheel's dist-info stays, for haloquant.environment's version record.
rm -rf /tmp/site/gguf
export PYTHONPATH=/tmp/site:$PWD:$PWD/.venv/share/haloquant/llama.cpp/gguf-py
export HALOQUANT_LLAMA_CONVERTER=$PWD/.venv/share/haloquant/llama.cpp DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
if ! python3 -c "import numpy as np; from haloquant.formats import get_format; from haloquant.llamacpp import ggml_quantize; ggml_quantize(get_format('Q4_K'), np.ones((2, 256), np.float32))" >/dev/null 2>&1; then
    echo "device_setup: llama-cpp-python does not run here; removed (no llama.cpp block candidate)"
    rm -rf /tmp/site/llama_cpp /tmp/site/llama_cpp_python*
fi
