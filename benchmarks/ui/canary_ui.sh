#!/usr/bin/env bash
# The MLflow UI after a few retrains and a canary, as a new user sees it, in a real headless Chrome (issue 41).
#   bash benchmarks/ui/canary_ui.sh [PROJECT_DIR] [OUT_DIR]
# Makes a demo project, retrains three times (the second and third with registry.promotion=canary and an open gate:
# each becomes the challenger, the third queued behind the second), serves it with half the users on the
# challenger, has a rater like the challenger's answers more, decides the canary, then screenshots the training
# experiment, a compare view of the PPO runs, the canary run and the traces filtered by arm.
# Needs `cd benchmarks/ui && npm install --no-save @sparticuz/chromium puppeteer-core` (README.md here).
set -euo pipefail
cd "$(dirname "$0")/../.."
P=${1:-/tmp/canary-ui}
OUT=${2:-docs/images}
BIN=$PWD/.venv/bin
rm -rf "$P"
"$BIN/rlhf" init "$P" --demo >/dev/null
R=(root="$P")
OPEN=(gate.min_reward_gain=-100 gate.min_win_rate=0 gate.min_judge_gain=null gate.max_kl=1e9
      gate.max_repeated_word_gain=null gate.min_distinct_2_ratio=null gate.max_disagreement_ratio=null
      gate.min_new_accuracy_gain=null)
echo "== retrain 1: the first champion"; "$BIN/rlhf" run "${R[@]}" | tail -3
echo "== retrain 2: a challenger";      "$BIN/rlhf" run "${R[@]}" ppo.steps=10 registry.promotion=canary "${OPEN[@]}" | tail -3
echo "== retrain 3: queued";            "$BIN/rlhf" run "${R[@]}" ppo.steps=14 registry.promotion=canary "${OPEN[@]}" | tail -3
TOKEN=$("$BIN/rlhf" raters add ann "${R[@]}" | tail -1)
PORT=5099
"$BIN/rlhf" model serve "${R[@]}" --port $PORT --share 0.5 registry.canary.poll_s=1 > /tmp/canary-ui-serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true; kill $MLF 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf localhost:$PORT/ping >/dev/null && break; sleep 1; done
"$BIN/python" - "$PORT" "$TOKEN" <<'PY'
import json, random, sys, urllib.request
port, token = sys.argv[1], sys.argv[2]
rng = random.Random(0)
def post(path, body, headers=()):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **dict(headers)})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())
arms = {"champion": 0, "challenger": 0}
for i in range(90):
    row = post("/invocations", {"inputs": [f"Review {i}: the film was"], "user": f"user-{i % 45}",
                                "params": {"max_new_tokens": 16, "seed": i}})["predictions"][0]
    arms[row["arm"]] += 1
    up = rng.random() < (0.85 if row["arm"] == "challenger" else 0.35)  # the simulated users prefer the challenger
    post("/feedback", {"trace_id": row["trace_id"], "value": up}, [("Authorization", f"Bearer {token}")])
print("answers per arm", arms)
PY
"$BIN/rlhf" canary status "${R[@]}" registry.canary.min_judged=15
"$BIN/rlhf" canary check "${R[@]}" registry.canary.min_judged=15 | tail -4
kill $SERVE
"$BIN/mlflow" server --backend-store-uri "sqlite:///$P/.rlhf/mlflow.db" --port 5077 > /tmp/canary-ui-mlflow.log 2>&1 &
MLF=$!
for _ in $(seq 60); do curl -sf localhost:5077/health >/dev/null && break; sleep 1; done
mkdir -p "$OUT"
EXPERIMENT=$("$BIN/rlhf" config "${R[@]}" | awk '/^  experiment:/ {print $2; exit}')
LANG=en_US.UTF-8 node benchmarks/ui/canary_screenshots.mjs http://127.0.0.1:5077 "$EXPERIMENT" "$OUT"
