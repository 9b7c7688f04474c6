#!/usr/bin/env bash
# Runs one hrjax command as a multi-process JAX job on this machine: N CPU processes, each with K host
# devices, joined through a coordinator on 127.0.0.1. The multi-host code path (sharded path-tree builds,
# global arrays, chief-only outputs, Orbax from every process) without a cluster.
#
#   launch/local.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- COMMAND [ARGS...]
#   launch/local.sh -n 2 -d 4 -- hrjax train --config=experiments/configs/tiny.py --workdir=runs/tiny_2x4
#
# COMMAND gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I appended. Process I's
# output goes to LOG_DIR/process_I.log (default: a new temp dir, named on stderr), process 0's also to
# stdout. If one process fails, the others are stopped; the exit status is the first failure's.
set -euo pipefail

processes=2 devices=4 port="" log_dir=""
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "error: no command: launch/local.sh [-n N] [-d K] -- hrjax train --config=... --workdir=..." >&2
  exit 2
fi
if [[ -z "$port" ]]; then  # a free port, chosen by the kernel
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
log_dir="${log_dir:-$(mktemp -d -t hrjax-local-XXXXXX)}"
mkdir -p "$log_dir"
echo "local.sh: $processes processes x $devices devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

pids=()
remaining=()
stop_all() {  # JAX takes SIGTERM as a preemption notice and keeps running: SIGKILL after a grace period
  ((${#remaining[@]})) || return 0
  kill -TERM "${remaining[@]}" 2>/dev/null
  for _ in 1 2 3 4 5 6; do kill -0 "${remaining[@]}" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "${remaining[@]}" 2>/dev/null
  return 0
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i" \
    >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
remaining=("${pids[@]}")
tail -n +1 -f "$log_dir/process_0.log" --pid="${pids[0]}" &
set +e
status=0
while ((${#remaining[@]})); do  # the first failure stops the others (they would wait for it in vain)
  wait -n -p finished "${remaining[@]}"
  code=$?
  next=()
  for pid in "${remaining[@]}"; do [[ "$pid" != "$finished" ]] && next+=("$pid"); done
  remaining=("${next[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    echo "local.sh: process $finished failed with status $code: stopping the others; logs in $log_dir" >&2
    stop_all
  fi
done
wait
exit "$status"
