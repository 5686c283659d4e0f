#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; jax.distributed auto-detects the pod.
# Usage: experiments/launch/tpu_pod.sh TPU_NAME ZONE gs://bucket/workdir --config=configs/vit.py:i1k_b16
set -euo pipefail
tpu=${1:?tpu name}; zone=${2:?zone}; workdir=${3:?workdir}; shift 3
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/vitok && pip install -q -e . 'jax[tpu]>=0.10.2,<0.11' &&
  python -m vitok.train --distributed --workdir=$workdir $*"
