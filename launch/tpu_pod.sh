#!/usr/bin/env bash
# Runs one hrjax command on every worker of an existing Cloud TPU VM slice (one process per host; JAX
# finds the other workers through the TPU metadata, so the command takes no --coordinator_address).
# Creates nothing: the TPU VM, the checkout of this repository and its environment on every worker are
# yours (see launch/README.md); use a gs:// --workdir so every worker writes to the same run directory.
#
#   launch/tpu_pod.sh -t TPU_NAME -z ZONE [-p PROJECT] [-r REMOTE_REPO] [-e ENV_ACTIVATE] -- COMMAND [ARGS...]
#   launch/tpu_pod.sh -t my-v5e-16 -z us-west4-a -- hrjax train \
#       --config=experiments/configs/qwen25_paper.py:math --workdir=gs://my-bucket/hrjax/qwen25_math
#
# -r: the repository on the workers (default: ~/hrjax); -e: a script sourced first (default:
# REMOTE_REPO/.venv/bin/activate, when it exists). -n: print the gcloud command instead of running it.
set -euo pipefail

tpu="" zone="" project="" remote_repo='~/hrjax' env_activate="" dry_run=0
while getopts "t:z:p:r:e:nh" opt; do
  case "$opt" in
    t) tpu="$OPTARG" ;;
    z) zone="$OPTARG" ;;
    p) project="$OPTARG" ;;
    r) remote_repo="$OPTARG" ;;
    e) env_activate="$OPTARG" ;;
    n) dry_run=1 ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$tpu" || -z "$zone" || $# -eq 0 ]]; then
  echo "error: launch/tpu_pod.sh -t TPU_NAME -z ZONE -- COMMAND [ARGS...] (see launch/README.md)" >&2
  exit 2
fi
env_activate="${env_activate:-$remote_repo/.venv/bin/activate}"
quoted=$(printf '%q ' "$@")
# every worker: the repo, its environment, then the command with JAX's TPU-slice auto-detection asked for
remote="cd $remote_repo && { [ -f $env_activate ] && . $env_activate || true; } && HRJAX_DISTRIBUTED=1 $quoted"
gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote")
[[ -n "$project" ]] && gcloud_args+=(--project="$project")
if [[ $dry_run -eq 1 ]]; then
  printf 'gcloud'; printf ' %q' "${gcloud_args[@]}"; printf '\n'
  exit 0
fi
exec gcloud "${gcloud_args[@]}"
