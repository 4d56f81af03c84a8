#!/usr/bin/env bash
# Runs one command on every worker of a TPU pod slice (each worker runs the same program; JAX's
# multi-host runtime connects them). The repository must already be at $REPO_DIR on every worker.
#
#   launch/tpu_run.sh TPU_NAME ZONE [PROJECT] -- sama-train --config=configs/stage1_sft.py:wan_14b
#
# Environment: REPO_DIR (default ~/sama_jax), SETUP=1 to create .venv and install requirements on
# every worker first, LOG_DIR (default /tmp/sama_jax_logs) for each worker's log.
set -euo pipefail

if [ $# -lt 4 ] || ! printf '%s\n' "$@" | grep -qx -- '--'; then
  sed -n '2,10p' "$0" >&2
  exit 2
fi
tpu_name=$1; zone=$2; shift 2
project_args=()
if [ "$1" != "--" ]; then project_args=(--project "$1"); shift; fi
shift  # the --
cmd=$(printf '%q ' "$@")
repo_dir=${REPO_DIR:-'~/sama_jax'}
log_dir=${LOG_DIR:-/tmp/sama_jax_logs}

setup=""
if [ "${SETUP:-0}" = "1" ]; then
  setup="python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . && "
fi

remote="cd ${repo_dir} && ${setup}mkdir -p ${log_dir} && \
source .venv/bin/activate && ${cmd} 2>&1 | tee ${log_dir}/worker_\$(hostname).log"

exec gcloud compute tpus tpu-vm ssh "$tpu_name" --zone "$zone" "${project_args[@]}" \
  --worker=all --command "$remote"
