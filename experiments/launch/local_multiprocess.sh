#!/usr/bin/env bash
# N local processes x D CPU devices each, talking through jax.distributed (gloo collectives).
# Usage: experiments/launch/local_multiprocess.sh N D WORKDIR [--config=... --config.x=...]
set -euo pipefail
num_processes=${1:?number of processes}; devices=${2:?devices per process}; workdir=${3:?workdir}
shift 3
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS=--xla_force_host_platform_device_count=$devices python -m vitok.train \
    --workdir="$workdir" --coordinator_address=127.0.0.1:$port \
    --num_processes="$num_processes" --process_id=$i "${@:---config=configs/vit.py:tiny}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
