#!/usr/bin/env bash
# Peak memory and round times of the add-one FedAvg job against model size, every process on
# this machine: `bench fedavg` (one process per member, bare rounds measured in the
# same run) for each size and client count, one JSON object a line into OUT, then a table on
# stdout and a plot (docs/memory-vs-model-size.svg) from them.
#
#   scripts/memory-sweep.sh [OUT] [SIZES_MIB] [CLIENTS]
#   scripts/memory-sweep.sh /tmp/sweep.jsonl "256 1024 2048 4096 8192" "2 4"
#
# Every size streams through disk (`--stream-above 0`, STREAM_ABOVE to change it): by
# default a model of up to 512 MiB is held in memory, which is faster and costs about 1.1
# times the model.
#
# Disk: a run of S MiB with N clients needs about (2 + N) x S free (the controller's global
# model and mean, one model per client); 8 GiB with 4 clients needs 48 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/memory-sweep.jsonl}
sizes=${2:-"256 1024 2048 4096 8192"}
clients=${3:-"2 4"}
cargo build --release -q -p flare-node
: >"$out"
for n in $clients; do
  for mib in $sizes; do
    echo "== ${mib} MiB, ${n} clients" >&2
    ./target/release/flare-node bench fedavg --model-mib "$mib" --keys 64 --clients "$n" \
      --rounds 2 --stream-above "${STREAM_ABOVE:-0}" --timeout-secs 3600 --json | tail -1 >>"$out"
  done
done
python3 scripts/plot-sweep.py "$out" docs/memory-vs-model-size.svg
