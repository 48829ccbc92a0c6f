#!/usr/bin/env bash
# The Client API example as a real federation, one process per member on 127.0.0.1: a
# flare-node server and four `digits_tch_federated` processes (the plain tch loop plus five
# lines). Prints the server's summary and fails unless the global model reaches 90 % test
# accuracy and beats the mean local-only model. Needs libtorch (scripts/install-libtorch.sh).
#   scripts/digits-tch-federated.sh [--cnn]      (extra arguments go to every client)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
eval "$(scripts/install-libtorch.sh --env)"
cargo build --release --features torch --bin flare-node --example digits_tch_federated >&2
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"
B="$TARGET/flare-node"
E="$TARGET/examples/digits_tch_federated"
DIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DIR"' EXIT

KIND="tch-mlp"
if [[ " $* " == *" --cnn "* ]]; then KIND="tch-cnn"; fi
PORT=$((20000 + RANDOM % 20000))
declare -A ID
for m in server hospital-1 hospital-2 hospital-3 hospital-4; do
  ID[$m]=$("$B" keygen --out "$DIR/$m.key" 2>/dev/null | grep -o '12D3KooW[A-Za-z0-9]*')
done
# The shipped topology's job, with these members' identities and the server's address.
sed -n '1,/^\[\[member\]\]/p' topologies/fedavg-digits-tch.toml | sed '$d' \
  | sed "s/kind = \"tch-mlp\"/kind = \"$KIND\"/" \
  | if [ "$KIND" = tch-cnn ]; then sed 's/^hidden = .*/channels = 16/'; else cat; fi >"$DIR/t.toml"
for m in server hospital-1 hospital-2 hospital-3 hospital-4; do
  printf '[[member]]\nname = "%s"\npeer_id = "%s"\n' "$m" "${ID[$m]}" >>"$DIR/t.toml"
  if [ "$m" = server ]; then printf 'addrs = ["/ip4/127.0.0.1/tcp/%s"]\n' "$PORT" >>"$DIR/t.toml"; fi
  printf '\n' >>"$DIR/t.toml"
done

# Four torch processes share this machine: one intra-op thread each, as torchrun does for its
# workers. With libtorch's default (a thread per core) they spin against each other, and a
# round of this job took 0.05-2.2 s instead of 15-30 ms (docs/client-api.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$B" run --topology "$DIR/t.toml" --name server --key "$DIR/server.key" --data-dir "$DIR/server" --json \
  >"$DIR/server.json" 2>"$DIR/server.log" &
SERVER=$!
for i in 1 2 3 4; do
  "$E" --epochs 2 --site $((i - 1)) "$@" --topology "$DIR/t.toml" --name "hospital-$i" \
    --key "$DIR/hospital-$i.key" --data-dir "$DIR/hospital-$i" >"$DIR/hospital-$i.out" 2>"$DIR/hospital-$i.log" &
done
if ! wait "$SERVER"; then
  tail -20 "$DIR/server.log" >&2
  exit 1
fi
wait
grep "done:" "$DIR/server.log" >&2
tail -1 "$DIR/server.json"
python3 - "$DIR/server.json" <<'PY'
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
acc, local = s["global"][-1]["accuracy"], s["local_only"]["mean_accuracy"]
print(f"{s['learner']} clients via the Client API: global test accuracy {acc:.4}, mean local-only {local:.4}", file=sys.stderr)
sys.exit(0 if acc >= 0.90 and acc > local else 1)
PY
