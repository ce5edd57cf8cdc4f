#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), copy this checkout to every worker,
# install it there, and run `ragjax train ... --distributed` on all workers at once.
#
#   TPU_NAME=ragjax-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-16 \
#   RUNTIME_VERSION=tpu-ubuntu2204-base \
#     launch/tpu_vm.sh [--dry-run] --config experiments/bios.py --workdir /mnt/shared/runs/bios \
#       [--config.key=value ...]
#
# Every argument except --dry-run goes to `ragjax train` unchanged; --distributed is added, and
# jax.distributed.initialize() finds the workers from the TPU VM metadata. --dry-run prints the
# gcloud commands instead of running them (and needs no gcloud login).
#
# The workdir must be one directory that every worker sees (checkpoints are written by all
# processes): an NFS/Filestore mount or a bucket mounted with gcsfuse on every worker (mount it
# with WORKER_SETUP). A gs:// URL is refused: the trainer opens the workdir with pathlib/os,
# which turns gs://bucket/x into a local directory "gs:/bucket/x" on each worker.
#
# Environment (defaults in brackets):
#   TPU_NAME [ragjax-$USER]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-16]
#   RUNTIME_VERSION [tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
#     v6e: v2-alpha-tpuv6e]
#   PROJECT        gcloud --project (default: the gcloud config's project)
#   CREATE_FLAGS   extra `tpu-vm create` flags, e.g. "--spot" or "--reserved"
#   SETUP [1]      0: skip the copy and install (the workers already have this checkout)
#   WORKER_SETUP   a shell command run on every worker before training, e.g.
#                  "sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.0.0.2:/vol /mnt/shared"
#   PYTHON_VERSION [3.11]  jax 0.10 needs Python >= 3.11; the runtime images ship 3.10, so the
#                  workers get a uv-managed interpreter and virtual environment
#   REMOTE_DIR [ragjax]   on each worker (relative to $HOME): src/ (this checkout) and venv/
#   DETACH [0]     1: start training under nohup (output in ~/REMOTE_DIR/train.log on each
#                  worker) and return; 0: stream every worker's output here until it ends
#   INDEXER_VMS [0]  joint training: M CPU VMs beside the slice (TPU_NAME-indexer-<j>, created
#                  or reused, same checkout and WORKER_SETUP mount), each running one
#                  asynchronous indexer worker (`ragjax indexer --shard j --num-shards M
#                  --wait-for-trainer 1800`, under nohup, log ~/REMOTE_DIR/indexer.log), started
#                  before training; the trainer gets --config.index.refresh.spawn_indexer=false
#   INDEXER_MACHINE_TYPE [n2-standard-16]  INDEXER_IMAGE_FAMILY [ubuntu-2204-lts]
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: [TPU_NAME=... ZONE=... ACCELERATOR_TYPE=... RUNTIME_VERSION=...] \
       launch/tpu_vm.sh [--dry-run] --config FILE[:arg] --workdir SHARED_DIR [--config.key=value ...]
EOF
  exit 2
}

dry_run=0
train_args=()
workdir=""
expect_workdir=0
for arg in "$@"; do
  if ((expect_workdir)); then workdir=$arg expect_workdir=0; fi
  case $arg in
    --dry-run) dry_run=1; continue ;;
    -h | --help) usage ;;
    --workdir) expect_workdir=1 ;;
    --workdir=*) workdir=${arg#--workdir=} ;;
    --distributed | --coordinator* | --num-processes* | --process-id*)
      echo "launch/tpu_vm.sh: $arg is set by this script (--distributed)" >&2
      usage
      ;;
  esac
  train_args+=("$arg")
done
[[ -n $workdir ]] || usage
case " ${train_args[*]} " in *" --config "* | *" --config="*) ;; *) usage ;; esac
if [[ $workdir == gs://* ]]; then
  cat >&2 <<EOF
launch/tpu_vm.sh: --workdir $workdir: gs:// URLs are not supported by the trainer yet (it would
write into a local directory named "gs:" on each worker). Use an absolute path that every worker
mounts at the same place: Filestore/NFS, or the bucket mounted with gcsfuse (installed on the
workers), e.g.
  WORKER_SETUP='sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && gcsfuse --implicit-dirs BUCKET /mnt/gcs'
  ... --workdir /mnt/gcs/runs/NAME
EOF
  exit 2
fi

if [[ $workdir != /* ]]; then
  echo "launch/tpu_vm.sh: --workdir $workdir: give an absolute path on a filesystem every worker" \
    "mounts (a relative one would land in ~/${REMOTE_DIR:-ragjax}/src, replaced at each setup)" >&2
  exit 2
fi

name=${TPU_NAME:-ragjax-${USER:-user}}
zone=${ZONE:-us-central2-b}
accelerator=${ACCELERATOR_TYPE:-v4-16}
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
python_version=${PYTHON_VERSION:-3.11}
remote=${REMOTE_DIR:-ragjax}
gcloud=(gcloud)
[[ -n ${PROJECT:-} ]] && gcloud+=(--project="$PROJECT")
tpu=("${gcloud[@]}" compute tpus tpu-vm)
create_flags=()
[[ -n ${CREATE_FLAGS:-} ]] && read -r -a create_flags <<<"$CREATE_FLAGS"
indexer_vms=${INDEXER_VMS:-0}
if [[ ! $indexer_vms =~ ^[0-9]+$ ]]; then
  echo "launch/tpu_vm.sh: INDEXER_VMS=$indexer_vms: expected a count >= 0" >&2
  exit 2
fi
((indexer_vms)) && train_args+=(--config.index.refresh.spawn_indexer=false)
vm=("${gcloud[@]}" compute instances)

q() {  # one word, single-quoted when it needs quoting (POSIX sh; copy-pasteable)
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {  # a command line, each word quoted by q
  local sep=""
  for word in "$@"; do printf '%s%s' "$sep" "$(q "$word")"; sep=" "; done
}
run() {  # print the command; run it unless --dry-run
  echo "+ $(show "$@")"
  ((dry_run)) || "$@"
}

# 1. Create the slice, or reuse it (starting it when it is stopped).
if ((dry_run)); then
  echo "# create the slice unless it exists (\`describe\` succeeds):"
  echo "+ $(show "${tpu[@]}" describe "$name" --zone="$zone" --format='value(state)')"
  run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" \
    --version="$runtime" "${create_flags[@]}"
else
  state=$("${tpu[@]}" describe "$name" --zone="$zone" --format='value(state)' 2>/dev/null) \
    || state=""
  if [[ -z $state ]]; then
    run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$runtime" "${create_flags[@]}"
  else
    echo "launch/tpu_vm.sh: reusing TPU VM $name in $zone (state $state)"
    [[ $state == STOPPED ]] && run "${tpu[@]}" start "$name" --zone="$zone"
  fi
fi

# 2. Copy this checkout (tracked and untracked-but-not-ignored files) to every worker and
#    install it into a fresh src/ with its own virtual environment.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${SETUP:-1} != 0 ]]; then
  tarball=${TMPDIR:-/tmp}/ragjax-src.tar.gz
  echo "+ (cd $(show "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(show "$tarball"))"
  if ((!dry_run)); then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -T - -czf "$tarball")
  fi
  run "${tpu[@]}" scp "$tarball" "$name:ragjax-src.tar.gz" --zone="$zone" --worker=all
  install="set -euo pipefail
rm -rf ~/$remote/src && mkdir -p ~/$remote/src && tar -xzf ~/ragjax-src.tar.gz -C ~/$remote/src
python3 -m pip install --user --quiet --upgrade uv
~/.local/bin/uv venv --allow-existing --python $python_version ~/$remote/venv
~/.local/bin/uv pip install --quiet --python ~/$remote/venv/bin/python -e ~/$remote/src 'jax[tpu]>=0.10,<0.11'"
  run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$install"
fi
if [[ -n ${WORKER_SETUP:-} ]]; then
  run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$WORKER_SETUP"
fi

# 2b. Indexer VMs (joint training): create or reuse, copy, install (CPU jax), mount, start.
for ((j = 0; j < indexer_vms; j++)); do
  host="$name-indexer-$j"
  if ((dry_run)); then
    echo "# create indexer VM $host unless it exists (\`describe\` succeeds):"
    run "${vm[@]}" create "$host" --zone="$zone" --machine-type="${INDEXER_MACHINE_TYPE:-n2-standard-16}" \
      --image-family="${INDEXER_IMAGE_FAMILY:-ubuntu-2204-lts}" --image-project=ubuntu-os-cloud
  elif ! "${vm[@]}" describe "$host" --zone="$zone" > /dev/null 2>&1; then
    run "${vm[@]}" create "$host" --zone="$zone" --machine-type="${INDEXER_MACHINE_TYPE:-n2-standard-16}" \
      --image-family="${INDEXER_IMAGE_FAMILY:-ubuntu-2204-lts}" --image-project=ubuntu-os-cloud
  fi
  if [[ ${SETUP:-1} != 0 ]]; then
    run "${gcloud[@]}" compute scp "$tarball" "$host:ragjax-src.tar.gz" --zone="$zone"
    # A plain Ubuntu image has no pip (TPU runtime images do); CPU jax instead of jax[tpu].
    run "${gcloud[@]}" compute ssh "$host" --zone="$zone" --command="python3 -m pip --version > /dev/null 2>&1 || (sudo apt-get update -qq && sudo apt-get install -y -qq python3-pip)
${install/\'jax\[tpu\]>=0.10,<0.11\'/\'jax>=0.10,<0.11\'}"
  fi
  if [[ -n ${WORKER_SETUP:-} ]]; then
    run "${gcloud[@]}" compute ssh "$host" --zone="$zone" --command="$WORKER_SETUP"
  fi
  indexer="cd ~/$remote/src && JAX_PLATFORMS=cpu ~/$remote/venv/bin/ragjax indexer --workdir $(q "$workdir") --shard $j --num-shards $indexer_vms --wait-for-trainer 1800"
  run "${gcloud[@]}" compute ssh "$host" --zone="$zone" \
    --command="nohup bash -c $(q "$indexer") > ~/$remote/indexer.log 2>&1 < /dev/null &"
done

# 3. Train: one process per worker; process 0 writes config.json and the metrics.
train="cd ~/$remote/src && ~/$remote/venv/bin/ragjax train $(show "${train_args[@]}") --distributed"
if [[ ${DETACH:-0} == 1 ]]; then
  train="nohup bash -c $(q "$train") > ~/$remote/train.log 2>&1 < /dev/null &"
fi
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$train"
if [[ ${DETACH:-0} == 1 ]]; then
  echo "launch/tpu_vm.sh: training started on every worker; follow it with"
  echo "  $(show "${tpu[@]}" ssh "$name" --zone="$zone" --worker=0 --command="tail -f ~/$remote/train.log")"
fi
echo "launch/tpu_vm.sh: delete the slice when done:"
echo "  $(show "${tpu[@]}" delete "$name" --zone="$zone")"
for ((j = 0; j < indexer_vms; j++)); do
  echo "  $(show "${vm[@]}" delete "$name-indexer-$j" --zone="$zone")"
done
