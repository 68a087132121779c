#!/usr/bin/env bash
# Every GPU check of the README in one call to a CUDA machine: the gpu-marked tests, the
# engine benchmarks (with a profile of the McMahan CNN step and A/B variants), time to
# accuracy on real MNIST, and the NCCL DDP checks. From the README's H100 timings it should
# take about 8 minutes (not yet run as a whole). The per-command limits only stop a hang;
# the logs are written as it goes, so a call cut short still returns what ran.
#
#   bash scripts/gpu_check.sh [tests] [engines] [accuracy] [ddp]    # default: all four
#
# MNIST comes from $FLTOOL_DATA (default .devdata/data, git-ignored, so that a copy can
# travel to a lent machine: `mkdir -p .devdata/data && cp -r ../shared/data/MNIST
# .devdata/data/`). The project is installed with `pip install --no-deps -e .` (the
# machine is expected to have torch, torchvision, typer, rich and pyyaml). Logs go to
# $OUT (default ./gpu-check): summary.txt, setup.log and one log per section. Every
# command has its own time limit, so one hang cannot eat the whole call.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export FLTOOL_DATA=${FLTOOL_DATA:-$PWD/.devdata/data} FLTOOL_CACHE=${FLTOOL_CACHE:-/tmp/fltool-cache}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
runs=/tmp/fltool-gpu-check-runs
sections=${*:-tests engines accuracy ddp}

# check LOG SECONDS CMD...: append CMD's output to $out/LOG.log; its exit code and time to summary.txt
check() {
    local log=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "\$ $*" >>"$out/$log.log"
    timeout "$limit" "$@" >>"$out/$log.log" 2>&1
    rc=$?
    echo "rc=$rc $((SECONDS - t0))s  $*" | tee -a "$out/summary.txt"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nproc
    python -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.version.cuda)'
} >"$out/summary.txt" 2>&1
check setup 120 pip install -q --no-deps --no-build-isolation -e .
if [ ! -f "$FLTOOL_DATA/MNIST/raw/train-images-idx3-ubyte.gz" ]; then
    echo "MNIST missing under $FLTOOL_DATA: the tests and the accuracy runs will fail" | tee -a "$out/summary.txt"
fi

case " $sections " in *" tests "*)
    check tests 300 python -m pytest -m gpu -n 0 -q -p no:cacheprovider  # one process: the tests share one GPU
esac

case " $sections " in *" engines "*)
    bench="python scripts/bench_engines.py --device cuda"
    check engines 90 $bench --workload 2nn --rounds 3
    check engines 150 $bench --workload cnn --rounds 2 --engines textbook vectorized vectorized:bf16 --profile 20
    check engines 60 $bench --workload cnn --rounds 2 --engines vectorized --no-cuda-graphs --profile 25
    check engines 45 $bench --workload cnn --rounds 2 --engines vectorized --variant batched-linear
    check engines 45 $bench --workload cnn --rounds 2 --engines vectorized --variant channels-last
    check engines 90 $bench --workload cifar --rounds 2 --engines textbook vectorized vectorized:bf16
    check engines 90 $bench --workload 2nn_1000 --rounds 1 --engines textbook vectorized
    check engines 120 $bench --workload cnn_1000 --rounds 1 --engines textbook vectorized
esac

case " $sections " in *" accuracy "*)
    check accuracy 90 fltool train configs/fedavg_mnist.yaml federated.engine=vectorized federated.rounds=100 \
        eval.target_accuracy=0.97 output.dir=$runs
    check accuracy 90 fltool train configs/fedavg_mnist_cnn.yaml output.dir=$runs
    check accuracy 30 sh -c "fltool eval $runs/fedavg_mnist_cnn/*/checkpoints/best.pt --json"
    check accuracy 90 fltool train configs/fedavg_mnist_cnn.yaml federated.amp=bf16 output.dir=$runs/bf16
esac

case " $sections " in *" ddp "*)
    check ddp 120 fltool launch --nproc 1 configs/ddp_mnist.yaml output.dir=$runs
    check ddp 120 python scripts/bench_ddp.py
    export TORCHINDUCTOR_CACHE_DIR=/tmp/fltool-inductor
    check ddp 150 fltool launch --nproc 1 configs/ddp_mnist.yaml ddp.compile=true ddp.epochs=1 output.dir=$runs
    echo "inductor cache files after ddp.compile=true: $(find /tmp/fltool-inductor -type f 2>/dev/null | wc -l)" \
        | tee -a "$out/summary.txt"
esac
