#!/usr/bin/env bash
# FedAvg vs local-only training on the digits, for several MLP sizes (the seed paper's Fig. 9
# experiment on our data). Runs topologies/fedavg-digits.toml with `hidden` replaced, prints a
# Markdown table of what each run measured.
#   scripts/mlp-sizes.sh [SIZES...]     e.g. scripts/mlp-sizes.sh "[]" "[32]"
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=("[]" "[32]" "[128, 64]" "[512, 256, 128, 64]")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "| hidden | global test accuracy (last round) | mean local-only test accuracy | local-only per member | seconds per round |"
echo "|---|---|---|---|---|"
for h in "${sizes[@]}"; do
  sed "s/^hidden = .*/hidden = $h/" topologies/fedavg-digits.toml > "$tmp/t.toml"
  echo "hidden = $h ..." >&2
  ./target/release/flare-node sim "$tmp/t.toml" --json 2>/dev/null | tail -1 | python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
h = sys.argv[1]
g = d["global"][-1]["accuracy"]
lo = d["local_only"]
per = ", ".join("%.3f" % m["accuracy"] for m in lo["members"].values())
secs = sum(d["round_secs"]) / len(d["round_secs"])
print("| `%s` | %.4f | %.4f | %s | %.3f |" % (h, g, lo["mean_accuracy"], per, secs))
' "$h"
done
