#!/usr/bin/env bash
# A training run on a Cloud TPU VM slice, single-host (v5e-8, v6e-8) or multi-host (v5p-16,
# v6e-16, v4-32 and up, where every host runs the same program on its own chips):
#
#   export PROJECT=my-project ZONE=us-east5-a TPU=v6e-16 NAME=eureka \
#     CONFIG=configs/qwen2_5_vl_7b_mmeureka.py WORKDIR=gs://my-bucket/runs/mm7b \
#     EXTRA="--config.model.path=Qwen/Qwen2.5-VL-7B-Instruct --config.data.train=/data/train.jsonl"
#   launch/tpu_vm.sh create && launch/tpu_vm.sh install && launch/tpu_vm.sh start
#
# Steps (each is one gcloud command; --dry-run prints them instead of running them):
#   create   create the slice (NAME, TPU accelerator type, RUNTIME: by default the version
#            for the TPU generation; SPOT=--spot for preemptible capacity); nothing happens if
#            it exists, and a preempted spot slice is deleted and created again.
#   install  on every worker (--worker=all): clone REPO (or pull it) into ~/eureka_jax and
#            pip-install eureka_jax[tpu] into ~/eureka_jax/.venv.
#   start    on every worker: `eureka-jax train --config CONFIG --workdir WORKDIR EXTRA` in the
#            background with EUREKA_JAX_DISTRIBUTED=1 (jax.distributed finds the other hosts from
#            the TPU metadata), output in ~/eureka_jax/train.log; then `logs`. WORKDIR must be a
#            bucket (gs://...) on a multi-host slice: every host writes its part of the checkpoint.
#   resume   create (if missing), install, start: after a preemption or a stop the same command
#            continues from the last complete checkpoint in WORKDIR.
#   logs     stream process 0's log (Ctrl-C stops the stream, not the run).
#   stop     SIGTERM the trainer on every worker: it saves a checkpoint after the step in flight
#            and exits. `gcloud compute tpus tpu-vm delete NAME` then frees the slice.
#   all      create, install, start.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] create|install|start|resume|logs|stop|all" >&2
  echo "  needs PROJECT and ZONE; create needs TPU; start/resume need CONFIG and WORKDIR" >&2
  echo "  (optional: NAME=eureka RUNTIME REPO EXTRA SPOT); see the header of $0" >&2
  exit 2
}

dry_run=
if [[ "${1:-}" == --dry-run ]]; then dry_run=1; shift; fi
(( $# == 1 )) || usage
step=$1
case "$step" in create|install|start|resume|logs|stop|all) ;; *) usage ;; esac

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || { echo "$0 $step: set $name" >&2; usage; }
  done
}
require PROJECT ZONE
case "$step" in
  create) require TPU ;;
  start) require CONFIG WORKDIR ;;
  resume|all) require TPU CONFIG WORKDIR ;;
esac
NAME="${NAME:-eureka}"
# The TPU software version that each generation's docs name for it.
case "${TPU:-}" in
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
RUNTIME="${RUNTIME:-$default_runtime}"
REPO="${REPO:-https://github.com/eureka-jax/eureka_jax.git}"

# Runs a command, or with --dry-run prints it (arguments with spaces in single quotes).
run() {
  if [[ -z "$dry_run" ]]; then "$@"; return; fi
  local arg line=
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then line+="$arg "; else line+="'$arg' "; fi
  done
  echo "${line% }"
}

tpu_vm() { run gcloud compute tpus tpu-vm "$1" "$NAME" --project "$PROJECT" --zone "$ZONE" "${@:2}"; }

create() {
  local state=
  if [[ -z "$dry_run" ]]; then
    state=$(gcloud compute tpus tpu-vm describe "$NAME" --project "$PROJECT" --zone "$ZONE" \
      --format "value(state)" 2>/dev/null || true)
  fi
  if [[ "$state" == PREEMPTED ]]; then
    tpu_vm delete --quiet  # a preempted spot slice cannot be restarted, only recreated
  elif [[ -n "$state" ]]; then
    echo "$NAME exists ($state)"
    return
  fi
  # shellcheck disable=SC2086  # SPOT is empty or one flag
  tpu_vm create --accelerator-type "$TPU" --version "$RUNTIME" ${SPOT:-}
}

install() {
  tpu_vm ssh --worker=all --command "set -e; [ -d eureka_jax ] || git clone $REPO eureka_jax; \
cd eureka_jax && git pull --ff-only && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -e \".[tpu]\""
}

start() {
  # nohup and a pid file: the run outlives the ssh session, and stop signals exactly it.
  tpu_vm ssh --worker=all --command "cd eureka_jax && { EUREKA_JAX_DISTRIBUTED=1 nohup \
.venv/bin/eureka-jax train --config $CONFIG --workdir $WORKDIR ${EXTRA:-} > train.log 2>&1 \
< /dev/null & echo \$! > train.pid; }"
  logs
}

logs() { tpu_vm ssh --worker=0 --command "tail -n +1 -F eureka_jax/train.log"; }

stop() {
  tpu_vm ssh --worker=all --command "[ -f eureka_jax/train.pid ] && kill -TERM \$(cat eureka_jax/train.pid) || true"
}

case "$step" in
  create) create ;;
  install) install ;;
  start) start ;;
  resume|all) create; install; start ;;
  logs) logs ;;
  stop) stop ;;
esac
