#!/usr/bin/env bash
# The measurements that need an NVIDIA GPU, as one run of about 8 minutes on one H100/H200 plus the GPU
# tests of part 0 (not yet timed: run TESTS=0 where a lease is short, and the tests alone with
# `make check-gpu`). Each part writes its JSON or log under OUTDIR; a part that fails is reported and the
# rest still run. Record what it prints in docs/PERFORMANCE.md.
#
#   bash bench/gpu_check.sh OUTDIR           # on a GPU node, in the repository root
#   SIZES=tiny bash bench/gpu_check.sh DIR   # a CPU smoke run of the same script (no GPU-only parts)
#   TESTS=0 bash bench/gpu_check.sh DIR      # without part 0 (the GPU tests)
#
# Where deepspeed, omegaconf or datasets are missing (a bare GPU image), carry the wheels that
# ../shared/tools/offline-wheels.sh builds as .whl/: they are installed into /tmp/site first.
# Part 0 needs pytest as well, which those wheels do not include.
#
# 0. The GPU tests (`make check-gpu`: pytest -m gpu, DeepSpeed's own accelerator, NCCL): check-gpu.log and
#    check-gpu.xml (junit; the async save's stall ratio is a property there). Duration not measured yet.
# 1. bench/throughput.py per size (bf16, ZeRO-1, flash SDPA): framework against plain PyTorch.
# 2. The same with train.compile=true (issue 9: the effect of compiling the blocks).
# 3. The flash kernel is what attention runs (SDPA restricted to it, forward and backward, bf16).
# 4. Training through the `deepspeed` launcher with NCCL in bf16 (issue 4, item 6).
# 5. With 2+ GPUs: tensor + sequence parallel (TP=2) on NCCL against TP=1 (issue 4, item 6).
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH || exit 1
fi
status=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log under OUTDIR, go on after a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || { status=1; tail -n 20 "$out/$name.log"; }
}
{ nvidia-smi || true; "$py" -c "import torch, sys; print(sys.version, torch.__version__, torch.version.cuda)"; } \
  >"$out/environment.txt" 2>&1
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# The same command as `make check-gpu`, on this interpreter (a bare image has no .venv).
[ "${TESTS:-1}" = 1 ] && part check-gpu 540 env -u DS_ACCELERATOR PRETRAIN_TEST_GPU=1 "$py" -m pytest -m gpu -rsP \
  --durations=10 --junitxml="$out/check-gpu.xml"

bench=(bench/throughput.py --steps 5 --rounds 2 --warmup 3 --accum 4)
for size in ${SIZES:-125m 350m 1.3b}; do
  micro=()
  [ "$size" = 1.3b ] && micro=(--micro-batch 4)  # the preset's 1 is for 8-way data parallelism
  part "throughput-$size" 240 "$py" "${bench[@]}" --size "$size" "${micro[@]}" --output "$out/throughput-$size.json"
  if [ "$size" != 350m ]; then
    part "throughput-$size-compile" 300 "$py" "${bench[@]}" --size "$size" "${micro[@]}" train.compile=true \
      --output "$out/throughput-$size-compile.json"
  fi
done

[ "$gpus" -ge 1 ] && part flash-sdpa 120 "$py" - <<'EOF'
# Attention restricted to the flash kernel: raises if our shapes or dtype would fall back to another.
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.config import load_config
from pretrain.model import Transformer

cfg = load_config("configs/125m.yaml", ["train.seq_len=2048"])
model = Transformer(cfg.model, cfg.padded_vocab_size, seed=0).cuda().bfloat16()
tokens = torch.randint(0, 256, (4, 2049), device="cuda")
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
print(f"flash attention forward and backward ran: loss {loss.item():.4f}")
EOF

common=(train.steps=30 train.eval_interval=10 checkpoint.interval=0 logging.interval=5 run.overwrite=true)
[ "$gpus" -ge 1 ] && part nccl-bf16 240 deepspeed --num_gpus 1 pretrain/main.py --config configs/125m.yaml \
  train.precision=bf16 train.global_batch_size=16 "${common[@]}" run.dir=/tmp/gpu-check/nccl
if [ "$gpus" -ge 2 ]; then
  for tp in 1 2; do
    part "tp$tp-sp" 240 deepspeed --num_gpus 2 pretrain/main.py --config configs/125m.yaml train.precision=bf16 \
      parallel.tp=$tp parallel.sequence_parallel=$([ $tp = 2 ] && echo true || echo false) \
      train.global_batch_size=16 "${common[@]}" "run.dir=/tmp/gpu-check/tp$tp"
    cp "/tmp/gpu-check/tp$tp/metrics.jsonl" "$out/tp$tp-metrics.jsonl" 2>/dev/null
  done
fi
exit $status
