#!/usr/bin/env bash
# Run COMMAND as NUM_PROCESSES processes of one multi-host JAX run on this machine, each with
# DEVICES_PER_PROCESS fake CPU devices, as the hosts of a TPU slice would run it:
#
#   launch/local_multihost.sh 2 4 eureka-jax train --config configs/tiny_cpu.py --workdir W
#
# Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D and
# EUREKA_COORDINATOR / EUREKA_NUM_PROCESSES / EUREKA_PROCESS_ID, which
# eureka_jax.distributed.initialize_from_env() turns into jax.distributed.initialize() over
# 127.0.0.1. Output lines are prefixed with "[ID] ". The launcher waits for all processes and
# exits with the status of the first that failed (0 if none did); as soon as one fails it stops
# the others (SIGTERM, then SIGKILL after GRACE_SECONDS, default 5), since they would otherwise
# wait for it in a collective. Ctrl-C or SIGTERM to the launcher stops all of them the same way.
set -euo pipefail

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
}
(( $# >= 3 )) || usage
num_processes=$1 devices_per_process=$2
shift 2
[[ "$num_processes" =~ ^[1-9][0-9]*$ && "$devices_per_process" =~ ^[1-9][0-9]*$ ]] || usage
grace_seconds=${GRACE_SECONDS:-5}

# A port that is free now; the coordinator (process 0) binds it a moment later.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Our device count replaces any inherited one (pytest's conftest exports its own).
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g' <<<"${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices_per_process}"

# setsid makes every process the leader of its own process group, so that stopping process i
# stops everything it started (its output filter, reward workers) and nothing else. The leader
# outlives a SIGTERM (`trap :`) until its command has exited, so the SIGKILL that follows still
# reaches a command that ignored the SIGTERM.
declare -A process_id_of_pid=()
for (( id = 0; id < num_processes; id++ )); do
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" PYTHONUNBUFFERED=1 \
    EUREKA_COORDINATOR="127.0.0.1:${port}" EUREKA_NUM_PROCESSES="$num_processes" \
    EUREKA_PROCESS_ID="$id" \
    setsid bash -c 'trap : TERM; set -o pipefail; "$@" 2>&1 | sed -u "s/^/[$EUREKA_PROCESS_ID] /"' \
    local_multihost "$@" &
  process_id_of_pid[$!]=$id
done

# Only processes not yet waited for are signalled. (`wait -n` is not used: bash forgets a job
# that a signal killed between two calls, so the loop polls instead.)
signal_all() {
  local pid
  for pid in "${!process_id_of_pid[@]}"; do kill "-$1" -- "-$pid" 2>/dev/null || true; done
}
status=0
kill_at=
# SIGTERM everyone (a training run checkpoints on SIGTERM), SIGKILL whoever is left after the grace.
stop_all() {
  (( status != 0 )) || status=$1
  signal_all TERM
  kill_at=$(( SECONDS + grace_seconds ))
}
trap 'echo "local_multihost: interrupted; stopping all processes" >&2; stop_all 130' INT TERM

while (( ${#process_id_of_pid[@]} > 0 )); do
  sleep 0.2
  for pid in "${!process_id_of_pid[@]}"; do
    kill -0 "$pid" 2>/dev/null && continue
    code=0
    wait "$pid" 2>/dev/null || code=$?
    id=${process_id_of_pid[$pid]}
    unset "process_id_of_pid[$pid]"
    if (( code != 0 && status == 0 )); then
      echo "local_multihost: process $id exited with status $code; stopping the others" >&2
      stop_all "$code"
    fi
  done
  if [[ -n "$kill_at" ]] && (( SECONDS >= kill_at )); then
    signal_all KILL
    kill_at=
  fi
done
exit "$status"
