#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU slice (every worker runs the same program; JAX's
# multi-host runtime connects them), optionally creating the slice and shipping the code first.
#
#   launch/tpu_run.sh [OPTIONS] TPU_NAME ZONE -- COMMAND...
#   launch/tpu_run.sh --create=v5p-64 --code=copy my-tpu us-east5-a -- \
#       sama-train --config=configs/stage1_sft.py:wan_14b --workdir=gs://bucket/runs/sft
#   launch/tpu_run.sh --stop my-tpu us-east5-a       # SIGTERM the job on every worker (it saves)
#
# Options:
#   --project=P             gcloud project (default: gcloud's)
#   --create=TYPE           create the slice first when it does not exist (e.g. v5p-64, v6e-64)
#   --runtime-version=V     TPU VM image for --create (default: v2-alpha-tpuv5 for v5p,
#                           v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)
#   --spot                  create a spot (preemptible) slice
#   --code=copy|git|none    put the code on every worker: copy = this checkout's tracked and
#                           untracked-not-ignored files (default); git = clone REPO_URL and check
#                           out this checkout's HEAD commit; none = already there
#   --dry-run               print every gcloud command instead of running it (the read-only
#                           `describe` that counts the workers still runs)
#   --stop                  end the job on every worker (SIGTERM: sama-train saves and exits)
# Environment: REPO_DIR (on the workers, default ~/sama_jax), REPO_URL (for --code=git),
#   SETUP=1 (create .venv on every worker and install requirements + jax[tpu]), LOG_DIR (here,
#   default ./tpu_logs/TPU_NAME: one log per worker; worker 0 is also streamed to the terminal).
# The job runs with SAMA_DISTRIBUTED=1 (sama-train calls jax.distributed.initialize()).
set -euo pipefail

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

project=""; create=""; runtime=""; spot=0; code=copy; dry_run=0; stop=0
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --project=*) project=${1#*=} ;;
    --create=*) create=${1#*=} ;;
    --runtime-version=*) runtime=${1#*=} ;;
    --spot) spot=1 ;;
    --code=*) code=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    --stop) stop=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "tpu_run.sh: unknown option $1" >&2; usage ;;
    *) positional+=("$1") ;;
  esac
  shift
done
[ ${#positional[@]} -eq 2 ] || usage
tpu_name=${positional[0]}; zone=${positional[1]}
if [ "$stop" = 0 ] && [ $# -eq 0 ]; then echo "tpu_run.sh: no COMMAND after --" >&2; usage; fi
case "$code" in copy|git|none) ;; *) echo "tpu_run.sh: --code must be copy, git or none" >&2; exit 2 ;; esac

repo_dir=${REPO_DIR:-'~/sama_jax'}
log_dir=${LOG_DIR:-./tpu_logs/$tpu_name}
pid_file=/tmp/sama_jax_job.pid
gflags=(--zone "$zone")
[ -n "$project" ] && gflags+=(--project "$project")

run() {  # prints, and runs unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$dry_run" = 1 ] || "$@"
}

# -- the slice ------------------------------------------------------------------------------------
if [ -n "$create" ]; then
  if ! gcloud compute tpus tpu-vm describe "$tpu_name" "${gflags[@]}" --format='value(name)' >/dev/null 2>&1; then
    if [ -z "$runtime" ]; then
      case "$create" in
        v5p-*) runtime=v2-alpha-tpuv5 ;;
        v6e-*) runtime=v2-alpha-tpuv6e ;;
        *) runtime=tpu-ubuntu2204-base ;;
      esac
    fi
    extra=(); [ "$spot" = 1 ] && extra+=(--spot)
    run gcloud compute tpus tpu-vm create "$tpu_name" "${gflags[@]}" --accelerator-type "$create" \
      --version "$runtime" "${extra[@]}"
  else
    echo "reusing the existing slice $tpu_name"
  fi
fi

# Workers: one network endpoint each.
if [ "$dry_run" = 1 ] && [ -n "$create" ] && ! gcloud compute tpus tpu-vm describe "$tpu_name" "${gflags[@]}" --format='value(name)' >/dev/null 2>&1; then
  case "$create" in  # not created in a dry run: hosts from the type (v5p: 8 cores a host, else 4 chips)
    v5p-*|v4-*) workers=$(( ${create#*-} / 8 )) ;;
    *) workers=$(( ${create#*-} / 4 )) ;;
  esac
  [ "$workers" -ge 1 ] || workers=1
else
  endpoints=$(gcloud compute tpus tpu-vm describe "$tpu_name" "${gflags[@]}" \
    --format='value(networkEndpoints[].ipAddress)')
  workers=$(echo "$endpoints" | tr ';,' '\n\n' | grep -c . || true)
  [ "$workers" -ge 1 ] || { echo "tpu_run.sh: $tpu_name has no workers (is it READY?)" >&2; exit 1; }
fi
echo "$tpu_name: $workers workers"

ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu_name" "${gflags[@]}" --worker=all --command "$1"; }

# -- stop -----------------------------------------------------------------------------------------
if [ "$stop" = 1 ]; then
  ssh_all "if [ -f $pid_file ]; then kill -TERM -- -\$(cat $pid_file) 2>/dev/null && echo \"\$(hostname): stopping\"; rm -f $pid_file; else echo \"\$(hostname): no job\"; fi"
  exit 0
fi

# -- the code -------------------------------------------------------------------------------------
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$code" = copy ]; then
  tarball=/tmp/sama_jax_code_$$.tgz
  run bash -c "cd $(printf %q "$here") && git ls-files -co --exclude-standard -z | tar czf $tarball --null -T -"
  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu_name:/tmp/sama_jax_code.tgz" "${gflags[@]}" --worker=all
  ssh_all "mkdir -p $repo_dir && tar xzf /tmp/sama_jax_code.tgz -C $repo_dir"
  [ "$dry_run" = 1 ] || rm -f "$tarball"
elif [ "$code" = git ]; then
  [ -n "${REPO_URL:-}" ] || { echo "tpu_run.sh: --code=git needs REPO_URL" >&2; exit 2; }
  commit=$(git -C "$here" rev-parse HEAD)
  ssh_all "if [ ! -d $repo_dir/.git ]; then git clone -q $REPO_URL $repo_dir; fi && cd $repo_dir && git fetch -q origin && git checkout -q $commit"
fi
if [ "${SETUP:-0}" = 1 ]; then
  jax_version=$(sed -n 's/^jax==//p' "$here/requirements.txt")
  ssh_all "cd $repo_dir && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . && .venv/bin/pip install -q 'jax[tpu]==$jax_version'"
fi

# -- the job: the same command on every worker, one log per worker --------------------------------
cmd=$(printf '%q ' "$@")
cmd=${cmd//\'/\'\\\'\'}   # inside single quotes below
remote="cd $repo_dir && . .venv/bin/activate && export SAMA_DISTRIBUTED=1 && \
setsid bash -c '$cmd' & pid=\$!; echo \$pid > $pid_file; wait \$pid; status=\$?; rm -f $pid_file; exit \$status"
if [ "$dry_run" = 1 ]; then
  for ((w = 0; w < workers; w++)); do
    run gcloud compute tpus tpu-vm ssh "$tpu_name" "${gflags[@]}" --worker=$w --command "$remote"
    echo "  (log: $log_dir/worker_$w.log)"
  done
  exit 0
fi
mkdir -p "$log_dir"
pids=()
for ((w = 0; w < workers; w++)); do
  log="$log_dir/worker_$w.log"
  if [ "$w" = 0 ]; then   # streamed here as well
    gcloud compute tpus tpu-vm ssh "$tpu_name" "${gflags[@]}" --worker=$w --command "$remote" \
      > >(tee "$log") 2>&1 &
  else
    gcloud compute tpus tpu-vm ssh "$tpu_name" "${gflags[@]}" --worker=$w --command "$remote" \
      > "$log" 2>&1 &
  fi
  pids+=($!)
done
echo "logs: $log_dir/worker_*.log"
failed=0
for ((w = 0; w < workers; w++)); do
  wait "${pids[$w]}" || { echo "worker $w failed: $log_dir/worker_$w.log" >&2; failed=1; }
done
exit $failed
