#!/usr/bin/env bash
# Create a Cloud TPU VM, install eureka_jax on every host, and start (or resume) a training run.
#
#   PROJECT=my-project ZONE=us-central2-b TPU=v4-32 NAME=eureka \
#   CONFIG=configs/qwen2_5_vl_7b_mmeureka.py WORKDIR=gs://my-bucket/runs/mm7b \
#   EXTRA="--config.model.path=Qwen/Qwen2.5-VL-7B-Instruct --config.data.train=/data/train.jsonl" \
#   bash launch/tpu_vm.sh
#
# Rerunning the same command resumes from WORKDIR (checkpoints are saved on SIGTERM too, so a
# preempted spot VM loses at most the step in flight). Steps: create (skipped if it exists),
# install, train. Set STEP=install or STEP=train to run one of them.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU:=v4-8}" "${NAME:=eureka}" "${CONFIG:?}" "${WORKDIR:?}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/eureka-jax/eureka_jax.git}"
STEP="${STEP:-all}"
SPOT="${SPOT:-}"   # set SPOT=--spot for preemptible capacity

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --project "$PROJECT" --zone "$ZONE" --worker=all \
    --command "$1"
}

if [[ "$STEP" == all || "$STEP" == create ]]; then
  if ! gcloud compute tpus tpu-vm describe "$NAME" --project "$PROJECT" --zone "$ZONE" >/dev/null 2>&1; then
    gcloud compute tpus tpu-vm create "$NAME" --project "$PROJECT" --zone "$ZONE" \
      --accelerator-type "$TPU" --version "$RUNTIME" $SPOT
  fi
fi

if [[ "$STEP" == all || "$STEP" == install ]]; then
  ssh_all "set -e; [ -d eureka_jax ] || git clone $REPO eureka_jax; cd eureka_jax; git pull; \
    python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]'"
fi

if [[ "$STEP" == all || "$STEP" == train ]]; then
  # Every host runs the same program (SPMD); jax.distributed discovers the others on TPU VMs.
  ssh_all "cd eureka_jax && EUREKA_JAX_DISTRIBUTED=1 nohup .venv/bin/eureka-jax train --config $CONFIG --workdir $WORKDIR \
    ${EXTRA:-} > train.log 2>&1 &"
  echo "started; follow with: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f eureka_jax/train.log'"
fi
