#!/usr/bin/env bash
# N local `ragjax train` processes forming one JAX runtime on this machine (CPU only).
#
#   launch/local.sh N D --config FILE[:arg] --workdir DIR [--config.key=value ...]
#
# Process i of N gets D virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=D,
# JAX_PLATFORMS=cpu), the coordinator 127.0.0.1:<free port>, --process-id i and gloo collectives;
# all share one --workdir (process 0 writes config.json and metrics, every process writes its
# checkpoint shards). Output lines are prefixed with [p<i>]. The script waits for all of them and
# exits non-zero when any fails; when one dies the others are stopped (SIGTERM, then SIGKILL
# after $KILL_GRACE seconds), because they would otherwise block in a collective.
#
# INDEXERS=M (default 0) also starts M asynchronous indexer workers for a joint run
# (`ragjax indexer --workdir DIR --shard j --num-shards M --wait-for-trainer 600`, CPU, output
# prefixed [i<j>]) and tells the trainer not to spawn its own
# (--config.index.refresh.spawn_indexer=false); they exit when the trainer writes its end marker.
#
# Environment: RAGJAX (the ragjax command; default: the repo's .venv/bin/ragjax, else `ragjax`
# on PATH), XLA_FLAGS (kept; the device count is appended), KILL_GRACE (seconds, default 10),
# INDEXERS (above).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh N D --config FILE[:arg] --workdir DIR [--config.key=value ...]
  N  number of processes (>= 1)
  D  virtual CPU devices per process (>= 1)
  INDEXERS=M in the environment: also M indexer workers (joint training)
example: launch/local.sh 2 1 --config experiments/bios.py:smoke --workdir /tmp/launch_test \
           --config.train.total_steps=2
EOF
  exit 2
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

(($# >= 2)) || usage
if ! is_count "$1" || ! is_count "$2"; then usage; fi
num_processes=$1 devices=$2
shift 2
train_args=("$@")

indexers=${INDEXERS:-0}
if [[ ! $indexers =~ ^[0-9]+$ ]]; then
  echo "launch/local.sh: INDEXERS=$indexers: expected a count >= 0" >&2
  usage
fi
has_config=0 workdir="" prev=""
for arg in "${train_args[@]}"; do
  [[ $prev == --workdir ]] && workdir=$arg
  prev=$arg
  case $arg in
    --config | --config=*) has_config=1 ;;
    --workdir=*) workdir=${arg#--workdir=} ;;
    --coordinator* | --num-processes* | --process-id* | --distributed | --cpu-collectives*)
      echo "launch/local.sh: $arg is set by this script" >&2
      usage
      ;;
  esac
done
((has_config)) && [[ -n $workdir ]] || usage
((indexers)) && train_args+=(--config.index.refresh.spawn_indexer=false)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${RAGJAX:-} ]]; then
  read -r -a ragjax <<<"$RAGJAX"
elif [[ -x $repo/.venv/bin/ragjax ]]; then
  ragjax=("$repo/.venv/bin/ragjax")
else
  ragjax=(ragjax)
fi
python=python3
[[ -x $repo/.venv/bin/python ]] && python=$repo/.venv/bin/python
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
grace=${KILL_GRACE:-10}

# One launch line, "<prefix> $ <env> <command, shell-quoted>", written by one printf: the
# output filters of the processes already started write to the same stdout, and separate
# writes could interleave with their lines (a pipe write under PIPE_BUF bytes is atomic).
say_command() {
  local prefix=$1 env=$2 line
  shift 2
  printf -v line ' %q' "$@"
  printf '%s $ %s%s\n' "$prefix" "$env" "$line"
}

pids=()
stop_all() {  # SIGTERM the processes still running, then SIGKILL what is left after $grace s
  local pid alive t
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "launch/local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

echo "launch/local.sh: $num_processes processes x $devices CPU devices, coordinator" \
  "127.0.0.1:$port, $indexers indexer worker(s)"
start=$SECONDS
names=()
for ((i = 0; i < num_processes; i++)); do
  cmd=("${ragjax[@]}" train "${train_args[@]}" --coordinator "127.0.0.1:$port"
       --num-processes "$num_processes" --process-id "$i" --cpu-collectives gloo)
  say_command "[p$i]" "JAX_PLATFORMS=cpu XLA_FLAGS=$(printf %q "$xla_flags")" "${cmd[@]}"
  JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${cmd[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
  names+=("process $i")
done
for ((j = 0; j < indexers; j++)); do
  cmd=("${ragjax[@]}" indexer --workdir "$workdir" --shard "$j" --num-shards "$indexers"
       --wait-for-trainer 600)
  say_command "[i$j]" "JAX_PLATFORMS=cpu" "${cmd[@]}"
  JAX_PLATFORMS=cpu "${cmd[@]}" > >(sed -u "s/^/[i$j] /") 2>&1 &
  pids+=($!)
  names+=("indexer $j")
done

# Poll (not `wait -n`: the output filters are jobs too) until all exit or one fails.
declare -A rc=()
failed=""
while ((${#rc[@]} < ${#pids[@]})); do
  for i in "${!pids[@]}"; do
    [[ -n ${rc[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    code=0
    wait "${pids[$i]}" || code=$?
    rc[$i]=$code
    echo "launch/local.sh: ${names[$i]} exited with status $code after $((SECONDS - start)) s"
    if ((code != 0)) && [[ -z $failed ]]; then
      failed=$i
      echo "launch/local.sh: ${names[$i]} failed; stopping the others" >&2
      stop_all
    fi
  done
  ((${#rc[@]} < ${#pids[@]})) && sleep 1
done
wait  # the output filters

if [[ -n $failed ]]; then
  echo "launch/local.sh: FAILED (${names[$failed]} exited with status ${rc[$failed]})" >&2
  exit 1
fi
echo "launch/local.sh: all $num_processes processes and $indexers indexer(s) exited 0 in" \
  "$((SECONDS - start)) s"
