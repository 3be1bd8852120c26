#!/usr/bin/env bash
# Every GPU check in one go: the GPU's name, the tests marked cuda, what a user runs on a GPU
# (two MNIST epochs of `ppl-vae train`, importance sampling of the whole test set at K = 5000,
# EM on MNIST) and every benchmark with --device cuda, at settings small enough for the whole
# script to take about 8 minutes on an H200 (the most wanted first). From the repository's root
# (this tree's package is put first on PYTHONPATH), with Pyro installed and PPL_VAE_DATA naming
# the folder that holds MNIST/raw:
#
#     bash benchmarks/cuda_check.sh [LOG_DIR]
#
# Every command has a timeout of its own, and one that fails or times out does not stop the
# rest. The output goes to LOG_DIR (default: cuda-check), one file per part: gpu.txt,
# pytest.log, user.log, benchmarks.log; each command's line, exit status and seconds are also
# printed. Nothing is written under docs/: the benchmarks run without --write (their sections
# of docs/BENCHMARKS.md hold the CPU figures); copy what you keep into its CUDA section by hand.
set -u
device=${CUDA_CHECK_DEVICE:-cuda} # cpu: a dry run of the script itself, on a machine without a GPU
out=$(mkdir -p "${1:-cuda-check}" && cd "${1:-cuda-check}" && pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # the package from this tree, installed or not
run_dir=$(mktemp -d)

part() { # part SECONDS LOG COMMAND...: COMMAND under a timeout, its output appended to LOG
	local seconds=$1 log=$2 start=$SECONDS status
	shift 2
	echo "=== $(date +%T) $*" | tee -a "$out/$log"
	timeout "$seconds" "$@" >>"$out/$log" 2>&1
	status=$?
	echo "=== exit $status after $((SECONDS - start)) s: $*" | tee -a "$out/$log"
}

{
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
	python -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, \
torch.cuda.is_available() and torch.cuda.get_device_name(), torch.get_num_threads(), 'threads')"
} >"$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

part 150 pytest.log python -m pytest -m cuda tests -p no:cacheprovider -q -rfEs -n 4 --durations=5

# the step against the hand-written one (CUDA graphs among the contenders), one MNIST epoch
part 200 benchmarks.log python benchmarks/svi_step.py --device "$device" --repeats 5 --steps 20 \
	--losses meanfield
# what a user runs: train (per-epoch seconds in metrics.jsonl), the test set at K = 5000
part 90 user.log python -m ppl_vae train --dataset mnist --epochs 2 --device "$device" --quiet \
	--out "$run_dir/mnist"
part 10 user.log cat "$run_dir/mnist/metrics.jsonl"
part 120 user.log python -m ppl_vae evaluate --run "$run_dir/mnist" --num-samples 5000 \
	--device "$device" --no-write
# EM on the device against scikit-learn on the CPU
part 90 benchmarks.log python benchmarks/em.py --device "$device" --threads 16 --iterations 10 \
	--repeats 2
part 60 user.log python -m ppl_vae em --dataset mnist --n-components 50 --device "$device" \
	--quiet --out "$run_dir/em"
# every other benchmark (ddp.py measures CPU processes; pythae_nll.py needs pythae)
part 40 benchmarks.log python benchmarks/importance.py --device "$device" --repeats 3
part 40 benchmarks.log python benchmarks/adam.py --device "$device" --repeats 3 --steps 10
part 60 benchmarks.log python benchmarks/evaluate_sizes.py --device "$device" --repeats 1
part 60 benchmarks.log python benchmarks/guides.py --device "$device" --repeats 3 --steps 5
part 40 benchmarks.log python benchmarks/spline_step.py --device "$device" --repeats 3 --steps 5
part 40 benchmarks.log python benchmarks/m2_step.py --device "$device" --repeats 5 --steps 5
part 40 benchmarks.log python benchmarks/ais_capture.py --device "$device" --repeats 3
part 60 benchmarks.log python benchmarks/ais.py --device "$device" --repeats 3
part 30 benchmarks.log python benchmarks/priors.py --device "$device" --repeats 7
part 40 benchmarks.log python benchmarks/pictures.py --device "$device" --repeats 3 \
	--run "$run_dir/mnist"
part 80 benchmarks.log python benchmarks/end_to_end.py --device "$device" --epochs 1 --repeats 1
part 150 benchmarks.log python benchmarks/compile_step.py --device "$device" --batches 1000 \
	--repeats 3 --steps 10

grep -h "^=== exit" "$out"/*.log
