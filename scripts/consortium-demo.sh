#!/usr/bin/env bash
# The README's "Run a consortium", end to end: four standing sites (lab-a..lab-d) on
# 127.0.0.1, each training on its own shard of the digits, and a researcher who submits a
# FedAvg job to them, watches it, and downloads the trained model.
#
#   scripts/consortium-demo.sh [WORK_DIR]   # default: a new temporary directory
#
# FLARE_DEMO_PORT_BASE (default 4101): the sites listen on it and the next three ports.
# FLARE_DEMO_TIMEOUT (default 300): seconds the job may take.
# Exits non-zero if a step fails or the model's accuracy is below 0.90; the sites are
# stopped (SIGINT) on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SITES=(lab-a lab-b lab-c lab-d)
PORT_BASE=${FLARE_DEMO_PORT_BASE:-4101}
TIMEOUT=${FLARE_DEMO_TIMEOUT:-300}
MIN_ACCURACY=0.90
PIDS=()
WORK=""

say() { echo "== $*"; }
# Each site's last log lines, so a failure shows what the sites saw.
log_tails() {
  [[ -n "$WORK" ]] || return 0
  for s in "${SITES[@]}"; do
    if [[ -f "$WORK/$s.log" ]]; then
      echo "-- $WORK/$s.log (last 15 lines)" >&2
      tail -n 15 "$WORK/$s.log" >&2
    fi
  done
}
fail() {
  echo "consortium-demo: $*" >&2
  log_tails
  exit 1
}

# Stops every site started with SIGINT (Ctrl-C), as an operator would; a site that does not
# stop within 30 s is killed. Fails if any did not stop cleanly.
stop_sites() {
  local pid status ok=0
  ((${#PIDS[@]})) || return 0
  say "stopping the sites (SIGINT)"
  kill -INT "${PIDS[@]}" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "consortium-demo: site process $pid did not stop within 30 s of SIGINT; killed" >&2
      kill -KILL "$pid" 2>/dev/null || true
      ok=1
    fi
    status=0
    wait "$pid" 2>/dev/null || status=$?
    if ((status != 0 && status != 137)); then
      echo "consortium-demo: site process $pid exited with status $status after SIGINT" >&2
      ok=1
    fi
  done
  PIDS=()
  return "$ok"
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  stop_sites || rc=1
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! [[ "$PORT_BASE" =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65532)); then
  fail "FLARE_DEMO_PORT_BASE=$PORT_BASE is not a port number in 1024..65532"
fi
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || fail "FLARE_DEMO_TIMEOUT=$TIMEOUT is not a number of seconds"

# The ports must be free: libp2p binds with SO_REUSEPORT, so a busy port would not stop a
# site from starting, it would share the port with whatever listens there.
for i in "${!SITES[@]}"; do
  port=$((PORT_BASE + i))
  if (: <>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port on 127.0.0.1 is in use (another demo still running?); free ports $PORT_BASE-$((PORT_BASE + 3)) or set FLARE_DEMO_PORT_BASE to another base"
  fi
done

say "building the release binary"
cargo build --release
B=$PWD/target/release/flare-node
# The researcher's and operator's commands: their own peer's log lines only when they warn.
cli() { RUST_LOG=warn "$B" "$@"; }

WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/flare-consortium.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
say "working in $WORK"

say "sample data: one shard of the digits per site, and held-out test rows"
cli sample-data digits --sites "${#SITES[@]}" --out "$WORK/data"

say "init: each site's key, policy (site.toml) and member table (members.toml)"
for i in "${!SITES[@]}"; do
  s=${SITES[$i]}
  id=$(cli init "$WORK/$s" --name "$s" --listen "/ip4/127.0.0.1/tcp/$((PORT_BASE + i))" 2>"$WORK/cli.err") ||
    fail "init $s: $(cat "$WORK/cli.err")"
  echo "$s  $id  port $((PORT_BASE + i))"
done

say "the consortium's member table: every site's entry, in every site's members.toml"
for s in "${SITES[@]}"; do
  grep -v '^#' "$WORK/$s/members.toml"
done >"$WORK/members.toml"
for s in "${SITES[@]}"; do
  cp "$WORK/members.toml" "$WORK/$s/members.toml"
done

say "a researcher's key, and each site's policy: alice may submit; its dataset \"digits\""
ALICE=$(cli keygen --out "$WORK/alice.key")
echo "alice  $ALICE"
for i in "${!SITES[@]}"; do
  s=${SITES[$i]}
  {
    printf '\n[[submitter]]\nname = "alice"\npeer_id = "%s"\nrole = "researcher"\n' "$ALICE"
    printf '\n[dataset.digits]\npath = "../data/site-%d.csv"\n' "$((i + 1))"
    # The controller's site measures the global model on held-out rows.
    if [[ $s == lab-a ]]; then printf 'test = "../data/test.csv"\n'; fi
  } >>"$WORK/$s/site.toml"
done

say "serve: the four standing peers, logs in $WORK/<site>.log"
for s in "${SITES[@]}"; do
  RUST_LOG=${RUST_LOG:-info} "$B" serve "$WORK/$s" >"$WORK/$s.log" 2>&1 &
  PIDS+=($!)
done
for i in "${!SITES[@]}"; do
  s=${SITES[$i]}
  for _ in $(seq 300); do
    grep -q "Ctrl-C to stop" "$WORK/$s.log" && break
    kill -0 "${PIDS[$i]}" 2>/dev/null || fail "$s stopped while starting"
    sleep 0.1
  done
  grep -q "Ctrl-C to stop" "$WORK/$s.log" || fail "$s did not come up within 30 s"
done
echo "all four sites are up"

say "submit: a FedAvg job of the MLP on each site's \"digits\" rows, controller lab-a"
cat >"$WORK/digits-job.toml" <<'EOF'
[job]
name = "digits-demo"
workflow = "fedavg"
controller = "lab-a"
clients = ["lab-a", "lab-b", "lab-c", "lab-d"]

[fedavg]
rounds = 15
min_clients = 4
round_timeout_secs = 60

[learner]
kind = "mlp"
hidden = [32]
lr = 0.1
epochs = 4          # local epochs per round
batch_size = 32

[model]
seed = 1            # initial weights, the same on every member

[data]
dataset = "digits"  # each site's own rows, as its site.toml registers them

[[member]]
name = "lab-a"

[[member]]
name = "lab-b"

[[member]]
name = "lab-c"

[[member]]
name = "lab-d"
EOF
AS_ALICE=(--key "$WORK/alice.key" --members "$WORK/members.toml" --to lab-a)
JOB=$(cli submit "$WORK/digits-job.toml" "${AS_ALICE[@]}") || fail "the sites did not take the job"
echo "job $JOB"

say "status: until the job is finished (at most $TIMEOUT s)"
deadline=$((SECONDS + TIMEOUT))
seen=""
while :; do
  out=$(cli status "$JOB" "${AS_ALICE[@]}" 2>"$WORK/cli.err") || fail "status: $(cat "$WORK/cli.err")"
  state=$(sed -n '1s/^job .*): \([a-z]*\); submitted by .*/\1/p' <<<"$out")
  round=$(awk '$2 ~ /^controller/ { print $5 }' <<<"$out")
  if [[ "$state $round" != "$seen" ]]; then
    echo "$state, round $round"
    seen="$state $round"
  fi
  case $state in
    finished) break ;;
    running | offered) ;;
    *) fail "the job is ${state:-in an unknown state}:"$'\n'"$out" ;;
  esac
  ((SECONDS < deadline)) || fail "the job did not finish within $TIMEOUT s:"$'\n'"$out"
  sleep 2
done
echo "$out"

say "jobs: what lab-a tells alice about her jobs"
cli jobs "${AS_ALICE[@]}"

say "download: the trained model and its results"
cli download "$JOB" "${AS_ALICE[@]}" --out "$WORK/out"
ls -l "$WORK/out"

stop_sites || fail "a site did not stop cleanly"
echo "the four sites stopped cleanly"

# The global model's accuracy on lab-a's held-out rows after the last round: the last
# "accuracy" in results.json's summary.global.
accuracy=$(awk '
  /"global": \[/ { inside = 1; next }
  inside && /^ *\]/ { inside = 0 }
  inside && /"accuracy":/ { gsub(/[",]/, ""); last = $2 }
  END { print last }
' "$WORK/out/results.json")
[[ -n "$accuracy" ]] || fail "no global accuracy in $WORK/out/results.json"
say "the trained model, on lab-a's held-out rows (files in $WORK)"
awk -v a="$accuracy" 'BEGIN { printf "accuracy %.4f\n", a }'
awk -v a="$accuracy" -v min="$MIN_ACCURACY" 'BEGIN { exit !(a >= min) }' ||
  fail "the trained model's accuracy $accuracy is below $MIN_ACCURACY"
