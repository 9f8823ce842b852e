#!/usr/bin/env bash
# Real Flower deployment on loopback: one SuperLink + K SuperNodes, then `flwr run` the app.
#
#   scripts/deploy_local.sh [--insecure] [--clients K] [--benchmark tiny|vision|...]
#                           [--method metamoe] [--experiment NAME] [--overrides 'a.b=1 c.d=2']
#                           [--seed 0] [--run-id ID] [--workdir DIR] [--output-dir DIR]
#                           [--cache-dir DIR] [--timeout SECONDS] [--keep]
#                           [--node-data PATH [--node-data PATH ...]] [--node-format FMT]
#
# Default: TLS (a self-signed CA + a server certificate with SAN 127.0.0.1/localhost, generated
# here with openssl) AND SuperNode authentication (SuperLink --enable-supernode-auth; one ECDSA
# P-384 key pair per SuperNode, generated here, public keys registered with
# `flwr supernode register`). `--insecure` = plaintext, no node authentication (quick trials).
#
# SuperNode i gets its private data through --node-config "partition-id=i num-partitions=K".
# With --node-data (once per SuperNode, benchmark.kind=local, e.g. --benchmark local) SuperNode i
# reads its own data from the i-th path instead: --node-config "... data=<path> [format=FMT]";
# K is the number of --node-data paths and the server is told to wait for K nodes.
# The connection is written to $FLWR_HOME/config.toml (Flower 1.41), FLWR_HOME is private to the
# workdir, runtime dependency installation is off, every port is picked free at run time.
# `flwr run --stream` exits 0 on failure, so the final status is read with `flwr ls --run-id`
# and the script fails unless it is `finished:completed` and metrics.json was written.
# Every process started here is stopped on exit (trap), found by a marker environment variable
# that all of them inherit. The run directory is printed on the last line of stdout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
INSECURE=0; CLIENTS=""; BENCHMARK="tiny"; METHOD="metamoe"; EXPERIMENT=""; OVERRIDES=""
SEED=0; RUN_ID=""; WORKDIR=""; OUTPUT_DIR=""; CACHE_DIR=""; TIMEOUT=1800; KEEP=0
NODE_DATA=(); NODE_FORMAT=""

die() { echo "deploy_local: error: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --insecure) INSECURE=1 ;;
    --clients) CLIENTS="${2:?--clients needs a value}"; shift ;;
    --benchmark) BENCHMARK="${2:?}"; shift ;;
    --method) METHOD="${2:?}"; shift ;;
    --experiment) EXPERIMENT="${2?}"; shift ;;
    --overrides) OVERRIDES="${2?}"; shift ;;
    --seed) SEED="${2:?}"; shift ;;
    --run-id) RUN_ID="${2:?}"; shift ;;
    --workdir) WORKDIR="${2:?}"; shift ;;
    --output-dir) OUTPUT_DIR="${2:?}"; shift ;;
    --cache-dir) CACHE_DIR="${2:?}"; shift ;;
    --timeout) TIMEOUT="${2:?}"; shift ;;
    --keep) KEEP=1 ;;  # keep the workdir (logs, certs, keys) even when it was a temp dir
    --node-data) NODE_DATA+=("$(cd "$(dirname "${2:?}")" && pwd)/$(basename "$2")"); shift ;;
    --node-format) NODE_FORMAT="${2:?}"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -x "$VENV/bin/flwr" ]] || die "no flwr in $VENV/bin (set VENV=/path/to/venv or run 'make setup')"
export PATH="$VENV/bin:$PATH"   # flwr spawns flower-superexec etc. by name (guide P6)
PY="$VENV/bin/python"

# ---------------------------------------------------------------- config, K, run id
if [[ ${#NODE_DATA[@]} -gt 0 ]]; then  # each SuperNode brings its own data: K = the paths
  for p in "${NODE_DATA[@]}"; do [[ -e "$p" ]] || die "--node-data $p: no such file or folder"; done
  OVERRIDES="${OVERRIDES:+$OVERRIDES }benchmark.num_clients=${#NODE_DATA[@]}"
fi
read -r K_CFG RUN_ID_DEFAULT < <(cd "$REPO" && "$PY" - "$BENCHMARK" "$METHOD" "$EXPERIMENT" "$OVERRIDES" "$SEED" <<'EOF'
import sys, time
from metamoe.config import ConfigError, num_clients, resolve_config
b, m, e, o, s = sys.argv[1:]
try:
    cfg = resolve_config({"benchmark": b, "method": m, "experiment": e, "overrides": o,
                          "seed": int(s)})
except ConfigError as err:
    print(f"configuration error: {err}", file=sys.stderr); sys.exit(2)
print(num_clients(cfg), f"{cfg.benchmark.name}-{m}{'-' + e if e else ''}-s{s}-deploy-"
      f"{time.strftime('%Y%m%d-%H%M%S')}")
EOF
) || die "invalid configuration (see above)"
K="${CLIENTS:-$K_CFG}"
[[ "$K" == "$K_CFG" ]] || die "--clients $K but benchmark '$BENCHMARK' has $K_CFG clients \
(benchmark.num_clients, or len(benchmark.domains) x benchmark.clients_per_domain); the ServerApp waits for exactly that many"
RUN_ID="${RUN_ID:-$RUN_ID_DEFAULT}"

if [[ -z "$WORKDIR" ]]; then WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/metamoe-deploy.XXXXXX")"; TMPWORK=1
else mkdir -p "$WORKDIR"; WORKDIR="$(cd "$WORKDIR" && pwd)"; TMPWORK=0; fi
OUTPUT_DIR="$(mkdir -p "${OUTPUT_DIR:-$REPO/results}" && cd "${OUTPUT_DIR:-$REPO/results}" && pwd)"
CACHE_DIR="${CACHE_DIR:-${METAMOE_CACHE_DIR:-$REPO/.cache}}"
mkdir -p "$CACHE_DIR"; CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"

export FLWR_HOME="$WORKDIR/flwr-home"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 PYTHONUNBUFFERED=1
# Every process started below inherits this marker; the EXIT trap stops exactly those.
export METAMOE_DEPLOY_ID="deploy-$$-$RANDOM$RANDOM"
mkdir -p "$FLWR_HOME" "$WORKDIR/logs"
LOGS="$WORKDIR/logs"
log() { echo "[deploy] $*" >&2; }

marked_pids() {
  local needle="METAMOE_DEPLOY_ID=$METAMOE_DEPLOY_ID" p
  for p in /proc/[0-9]*; do
    [[ "${p#/proc/}" == "$$" || "${p#/proc/}" == "$BASHPID" ]] && continue
    if tr '\0' '\n' 2>/dev/null < "$p/environ" | grep -qxF "$needle"; then echo "${p#/proc/}"; fi
  done
}
cleanup() {
  local rc=$? pids i
  trap - EXIT INT TERM
  for sig in TERM KILL; do
    pids="$(marked_pids)"
    [[ -z "$pids" ]] && break
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
    for i in $(seq 1 50); do [[ -z "$(marked_pids)" ]] && break; sleep 0.2; done
  done
  pids="$(marked_pids)"
  [[ -n "$pids" ]] && log "WARNING: could not stop processes: $pids"
  if [[ $rc -ne 0 ]]; then
    log "FAILED (exit $rc). Logs: $LOGS"
    for f in "$LOGS"/*.log; do [[ -f "$f" ]] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }; done
  fi
  if [[ $TMPWORK == 1 && $KEEP == 0 && $rc -eq 0 ]]; then rm -rf "$WORKDIR"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- ports (free, picked now)
read -r -a PORTS < <("$PY" - "$((K + 1))" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
LINK_PORT="${PORTS[0]}"
ADDR="127.0.0.1:$LINK_PORT"

# ---------------------------------------------------------------- TLS + node keys
LINK_SEC=(); NODE_SEC=()
if [[ $INSECURE == 1 ]]; then
  cat >&2 <<'EOF'
###########################################################################################
#  WARNING: --insecure: NO TLS and NO SuperNode authentication. Model weights, sketches and #
#  router vectors travel in plaintext and any process can join as a SuperNode.            #
#  Use this only for quick local trials, never across machines.                           #
###########################################################################################
EOF
  LINK_SEC=(--insecure)
  NODE_SEC=(--insecure)
  CONN_SEC='insecure = true'
else
  C="$WORKDIR/certs"; mkdir -p "$C"
  cat > "$C/server.cnf" <<'EOF'
[req]
distinguished_name = dn
req_extensions = v3_req
prompt = no
[dn]
CN = localhost
[v3_req]
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt
[alt]
DNS.1 = localhost
IP.1 = 127.0.0.1
IP.2 = ::1
EOF
  {
    openssl genrsa -out "$C/ca.key" 4096
    openssl req -new -x509 -key "$C/ca.key" -sha256 -days 2 -subj "/CN=metamoe-deploy-local CA" \
      -out "$C/ca.crt"
    openssl genrsa -out "$C/server.key" 4096
    openssl req -new -key "$C/server.key" -out "$C/server.csr" -config "$C/server.cnf"
    openssl x509 -req -in "$C/server.csr" -CA "$C/ca.crt" -CAkey "$C/ca.key" -CAcreateserial \
      -out "$C/server.pem" -days 2 -sha256 -extensions v3_req -extfile "$C/server.cnf"
  } > "$LOGS/openssl.log" 2>&1 || die "openssl failed (see $LOGS/openssl.log)"
  chmod 600 "$C"/*.key
  LINK_SEC=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem"
            --ssl-keyfile "$C/server.key" --enable-supernode-auth)
  NODE_SEC=(--root-certificates "$C/ca.crt")
  CONN_SEC="root-certificates = \"$C/ca.crt\""
  mkdir -p "$WORKDIR/keys"
  for i in $(seq 0 $((K - 1))); do   # ECDSA P-384 in OpenSSH format (what flwr 1.41 loads)
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "metamoe-supernode-$i" -f "$WORKDIR/keys/node$i" \
      || die "ssh-keygen failed"
  done
fi

# ---------------------------------------------------------------- connection (config.toml)
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "deploy"

[superlink.deploy]
address = "$ADDR"
$CONN_SEC
EOF

# ---------------------------------------------------------------- SuperLink
log "SuperLink on $ADDR ($([[ $INSECURE == 1 ]] && echo INSECURE || echo 'TLS + SuperNode auth')), workdir $WORKDIR"
mkdir -p "$WORKDIR/superlink"
( cd "$WORKDIR/superlink" && exec flower-superlink "${LINK_SEC[@]}" --host 127.0.0.1 \
    --port "$LINK_PORT" --database "$WORKDIR/superlink/state.db" \
    --disable-runtime-dependency-installation ) > "$LOGS/superlink.log" 2>&1 &
LINK_PID=$!
for i in $(seq 1 120); do
  kill -0 "$LINK_PID" 2>/dev/null || die "flower-superlink exited (see $LOGS/superlink.log)"
  grep -q "Uvicorn running on" "$LOGS/superlink.log" 2>/dev/null \
    && flwr ls deploy --format json 2>/dev/null | grep -q '"success": true' && break
  [[ $i == 120 ]] && die "SuperLink did not answer on $ADDR within 60 s"
  sleep 0.5
done

# ---------------------------------------------------------------- SuperNodes
for i in $(seq 0 $((K - 1))); do
  AUTH=()
  if [[ $INSECURE == 0 ]]; then
    flwr supernode register "$WORKDIR/keys/node$i.pub" deploy --name "node$i" \
      > "$LOGS/register-$i.log" 2>&1 || die "flwr supernode register failed ($LOGS/register-$i.log)"
    AUTH=(--auth-supernode-private-key "$WORKDIR/keys/node$i")
  fi
  mkdir -p "$WORKDIR/supernode-$i"
  ( cd "$WORKDIR/supernode-$i" && exec flower-supernode "${NODE_SEC[@]}" "${AUTH[@]}" \
      --superlink "$ADDR" --host 127.0.0.1 --port "${PORTS[$((i + 1))]}" \
      --node-config "partition-id=$i num-partitions=$K${NODE_DATA:+ data=\"${NODE_DATA[$i]}\"}${NODE_FORMAT:+ format=\"$NODE_FORMAT\"}" ) \
      > "$LOGS/supernode-$i.log" 2>&1 &
  if [[ ${#NODE_DATA[@]} -gt 0 ]]; then log "SuperNode $i reads its own data from ${NODE_DATA[$i]}"; fi
done
log "$K SuperNodes started (partition-id 0..$((K - 1)))"

# ---------------------------------------------------------------- run
RC_FILE="$WORKDIR/run-config.toml"
"$PY" - "$RC_FILE" "$BENCHMARK" "$METHOD" "$EXPERIMENT" "$OVERRIDES" "$SEED" "$RUN_ID" \
      "$OUTPUT_DIR" "$CACHE_DIR" <<'EOF'
import json, sys
path, b, m, e, o, s, rid, out, cache = sys.argv[1:]
rc = {"benchmark": b, "method": m, "experiment": e, "overrides": o, "seed": int(s),
      "run-id": rid, "output-dir": out, "cache-dir": cache}
with open(path, "w") as f:
    for k, v in rc.items():
        f.write(f"{k} = {json.dumps(v)}\n")
EOF
T0=$(date +%s)
OUT="$(cd "$WORKDIR" && flwr run "$REPO" deploy --format json --run-config "$RC_FILE" 2> "$LOGS/flwr-run.err")" \
  || die "flwr run failed: $OUT $(cat "$LOGS/flwr-run.err")"
FLWR_RUN=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["run-id"])' "$OUT" 2>/dev/null) \
  || die "flwr run gave no run id: $OUT"
log "flwr run-id $FLWR_RUN, run '$RUN_ID' -> $OUTPUT_DIR/$RUN_ID"
timeout "$TIMEOUT" flwr log "$FLWR_RUN" deploy > "$LOGS/run.log" 2>&1 \
  || log "flwr log ended with status $? (timeout ${TIMEOUT}s?)"
STATUS=""
for i in $(seq 1 60); do
  STATUS=$(flwr ls --run-id "$FLWR_RUN" deploy --format json 2>/dev/null | "$PY" -c \
    'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])' 2>/dev/null || true)
  [[ "$STATUS" == finished* ]] && break
  sleep 1
done
log "run $FLWR_RUN ended as '$STATUS' after $(( $(date +%s) - T0 )) s"
[[ "$STATUS" == "finished:completed" ]] || { tail -n 40 "$LOGS/run.log" >&2; die "run status is '$STATUS', not finished:completed"; }
RUN_DIR="$OUTPUT_DIR/$RUN_ID"
[[ -f "$RUN_DIR/metrics.json" ]] || die "run completed but wrote no $RUN_DIR/metrics.json"
cp "$LOGS/run.log" "$RUN_DIR/deploy-run.log" 2>/dev/null || true
echo "$RUN_DIR"
