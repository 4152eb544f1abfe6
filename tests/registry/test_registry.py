"""Registry and serving with real MLflow (SQLite): a policy is logged as a self-contained pyfunc,
registered, aliased, promoted, rolled back; `mlflow models serve` answers /invocations and turns bad
requests into clean 400s (one sentence naming the field, no stack trace)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from components import tracking
from components.registry.policy_model import Limits
from components.registry.registry import CANDIDATE, CHAMPION, alias_version, log_and_register, promote, rollback

NAME = "test-policy"
V1_LIMITS = {"max_prompt_tokens": 24, "max_prompts": 4}  # v1 is logged with these caps; v2 with the defaults
# and served with these overrides (MLFLOW_PYFUNC_INFERENCE_CONFIG)
SERVE_CONFIG = {"max_new_tokens_cap": 64, "max_prompt_chars": 200, "max_body_bytes": 4096}


@pytest.fixture(scope="module")
def registry(stages, reward, tmp_path_factory):
    """Two registered versions of the SFT policy, in a project of this module's own (its registry, its traces and
    the data its feedback lands in): v1 the SFT weights with the reward model bundled (best-of-n), v2 the base + SFT
    adapter without it. -> (the session's stages with this project's root and config, versions)"""
    from dataclasses import replace

    from components.data.versioning import ensure_data
    from tests.conftest import make_project

    root = tmp_path_factory.mktemp("registry") / "proj"
    stages = replace(stages, cfg=make_project(root), root=root)
    ensure_data(stages.cfg)  # the demo_small data, versioned: what guided PPO reads and feedback lands in
    tracking.setup(stages.cfg)
    adapter = str(Path(stages.sft_dir).parent / "adapter")
    versions = []
    for i in range(2):
        with mlflow.start_run(run_name=f"register-{i}"):
            versions.append(
                log_and_register(
                    NAME,
                    stages.sft_dir if i == 0 else stages.base_dir,
                    None if i == 0 else adapter,
                    {"data_version": "v1", "try": str(i)},
                    limits=V1_LIMITS if i == 0 else None,
                    reward_dir=reward.head_dir if i == 0 else None,
                )
            )
    return stages, versions


def test_register_promote_and_rollback(registry):
    _, (v1, v2) = registry
    assert alias_version(NAME, CANDIDATE) == v2.version  # the newest registered version is the candidate
    assert alias_version(NAME, CHAMPION) is None
    with pytest.raises(ValueError, match="no champion"):
        rollback(NAME)
    assert promote(NAME, v1.version, approver="auto") is None
    assert promote(NAME, v2.version, approver="alice") == v1.version
    version = mlflow.MlflowClient().get_model_version(NAME, v2.version)
    assert version.tags["approver"] == "alice" and version.tags["previous_champion"] == v1.version
    assert version.tags["data_version"] == "v1"
    assert rollback(NAME) == (v2.version, v1.version)
    assert alias_version(NAME, CHAMPION) == v1.version


def test_cli_rollback(registry, prefect_server, capsys):  # the rollback takes the retrain slot: a Prefect server
    from cli.main import main

    stages, (v1, v2) = registry
    overrides = [f"root={stages.root}", f"tracking.registered_model_name={NAME}"]
    promote(NAME, v1.version, approver="a")
    assert main(["rollback", *overrides]) == 1  # v1 replaced no earlier champion
    assert "nothing to roll back to" in capsys.readouterr().err
    promote(NAME, v2.version, approver="b")
    assert main(["rollback", *overrides]) == 0
    assert f"moved from v{v2.version} back to v{v1.version}" in capsys.readouterr().out
    assert alias_version(NAME, CHAMPION) == v1.version


def test_registered_model_is_self_contained_and_generates(registry):
    _, (v1, _) = registry
    model = mlflow.pyfunc.load_model(v1.model_uri)
    out = model.predict(
        pd.DataFrame({"prompt": ["The film was", "These headphones"]}), params={"seed": 0, "max_new_tokens": 8}
    )
    assert list(out.columns) == ["response", "score"] and len(out) == 2
    assert all(isinstance(r, str) for r in out["response"])
    again = model.predict(
        pd.DataFrame({"prompt": ["The film was", "These headphones"]}), params={"seed": 0, "max_new_tokens": 8}
    )
    assert out.equals(again), "a seed makes generation reproducible"
    state = torch.get_rng_state()
    model.predict(["The film was"], params={"seed": 5, "max_new_tokens": 4})
    assert torch.equal(torch.get_rng_state(), state), "a seeded request leaves the process's global RNG as it was"
    assert len(model.predict(["One prompt"], params={"temperature": 0.0, "max_new_tokens": 4})) == 1
    local = Path(mlflow.artifacts.download_artifacts(v1.model_uri))
    weights = {p.suffix for p in local.rglob("*") if p.is_file()}
    assert ".safetensors" in weights and not ({".bin", ".pt", ".pkl"} & weights), "safetensors only"


def test_best_of_n_returns_the_highest_scoring_of_its_n_samples(registry, reward):
    from peft import PeftModel

    from components.models.loading import load_causal_lm, load_tokenizer
    from components.models.roles import ScalarHead, sequence_scores
    from components.models.scoring import encode
    from components.registry.policy_model import DEFAULT_PARAMS

    stages, (v1, _) = registry
    model = mlflow.pyfunc.load_model(v1.model_uri)
    prompts = ["The film was", "After a week with these headphones, I think", "Honest review of the kettle:"]
    params = {"seed": 3, "n": 4, "max_new_tokens": 12}
    texts, scores = model.unwrap_python_model().candidates(prompts, {**DEFAULT_PARAMS, **params})
    assert [len(t) for t in texts] == [4, 4, 4] and all(len(set(t)) > 1 for t in texts), "n different samples"
    out = model.predict(prompts, params=params)
    for i, row in out.iterrows():
        best = max(range(4), key=scores[i].__getitem__)
        assert row["response"] == texts[i][best] and row["score"] == pytest.approx(max(scores[i]))
        assert row["score"] >= max(scores[i]) - 1e-9
    # the bundled scorer is the reward model: the same scores as the pipeline's own scoring (evaluation, PPO)
    cfg = stages.cfg
    scorer = PeftModel.from_pretrained(
        load_causal_lm(stages.sft_dir, cfg.model), str(Path(reward.head_dir) / "adapter")
    )
    head, meta = ScalarHead.load(Path(reward.head_dir))
    flat = [t for row in texts for t in row]
    ids, mask = encode(
        load_tokenizer(stages.sft_dir, cfg.model),
        [p for p in prompts for _ in range(4)],
        flat,
        meta["max_length"],
        "cpu",
    )
    with torch.no_grad():
        expected = (sequence_scores(scorer.eval(), head, ids, mask) - meta["reward_mean"]) / meta["reward_std"]
    assert torch.allclose(torch.tensor([s for row in scores for s in row]), expected, atol=1e-4)
    # best of 4 beats one sample on average over prompts (same seed)
    many = ["The film was", "My new kettle", "Honest review of this tent:", "I watched the sequel and"]
    one = model.predict(many, params={"seed": 7, "n": 1, "max_new_tokens": 12})["score"].mean()
    four = model.predict(many, params={"seed": 7, "n": 4, "max_new_tokens": 12})["score"].mean()
    assert four > one


def test_best_of_n_tells_candidates_apart_after_a_prompt_longer_than_the_reward_models_window(registry):
    """Issue 28, item 8: the reward model reads max_length tokens (96 here); serving takes prompts up to the context.
    Cut from the right, a long prompt filled the window and every candidate scored the same. Cut from the left,
    each candidate is scored on its own response and the end of its prompt."""
    from components.registry.policy_model import DEFAULT_PARAMS

    _, (v1, _) = registry
    model = mlflow.pyfunc.load_model(v1.model_uri, model_config={"max_prompt_tokens": 1000})
    policy = model.unwrap_python_model()
    prompt = "I bought this after reading many reviews of it, and " * 6 + "my verdict:"
    n_tokens = len(policy.tok(prompt, add_special_tokens=False)["input_ids"])
    assert policy.scorer.max_length < n_tokens <= policy.context_tokens - 8, n_tokens
    texts, scores = policy.candidates([prompt], {**DEFAULT_PARAMS, "seed": 3, "n": 4, "max_new_tokens": 8})
    assert len(set(texts[0])) > 1 and len(set(scores[0])) == len(set(texts[0])), (texts, scores)


def test_best_of_n_needs_the_reward_model(registry):
    _, (_, v2) = registry  # logged without its reward model
    model = mlflow.pyfunc.load_model(v2.model_uri)
    assert list(model.predict(["The film was"], params={"seed": 0, "max_new_tokens": 4}).columns) == ["response"]
    with pytest.raises(MlflowException, match="n must be in 1..1 for this model, got 2: it was registered without"):
        model.predict(["The film was"], params={"n": 2})


def test_serving_caps_are_logged_and_held_to_the_model_context(registry):
    _, (v1, v2) = registry
    logged = {
        v.version: mlflow.models.get_model_info(v.model_uri).flavors["python_function"]["config"] for v in (v1, v2)
    }  # the MLmodel's model_config
    assert logged == {v1.version: {**Limits().as_config(), **V1_LIMITS}, v2.version: Limits().as_config()}
    with pytest.raises(ValueError, match="unknown serving limits"):
        Limits.from_config({"max_batch": 3})
    with pytest.raises(ValueError, match="max_prompts must be a positive integer"):
        Limits(max_prompts=0)
    with pytest.raises(ValueError, match="at least the default max_new_tokens"):
        Limits(max_new_tokens_cap=10)
    # caps above the demo model's 128-token context: the context governs
    model = mlflow.pyfunc.load_model(v2.model_uri, model_config={"max_prompt_tokens": 1000, "max_new_tokens_cap": 1000})
    with pytest.raises(MlflowException, match=r"max_new_tokens must be in 1\.\.127, got 128"):
        model.predict(["The film was"], params={"max_new_tokens": 128})
    with pytest.raises(MlflowException, match=r"allowed 1\.\.8 tokens .*128-token context less max_new_tokens=120"):
        model.predict(["The film was " * 5], params={"max_new_tokens": 120})
    assert len(model.predict(["The film"], params={"max_new_tokens": 120, "seed": 0})) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> tuple[int, str]:
    """POST /invocations -> (HTTP status, response body)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def predictions(port: int, body: dict) -> dict:
    status, text = post(port, body)
    assert status == 200, text
    return json.loads(text)


def wait_until_serving(proc: subprocess.Popen, port: int, timeout_s: float = 180, log: Path | None = None) -> None:
    """Until the scoring server answers /ping; its output (piped, or its `log` file) in the failure when it exits or
    times out."""
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except OSError as e:
            if proc.poll() is not None or time.time() > deadline:
                out = log.read_text(errors="replace") if log else proc.stdout.read().decode()
                raise AssertionError(f"server did not start:\n{out[-3000:]}") from e
            time.sleep(1)


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    """One `mlflow models serve` of the champion (v1: V1_LIMITS, SERVE_CONFIG) for all serving tests: -> port."""
    stages, (v1, _) = registry
    promote(NAME, v1.version, approver="test")
    port = free_port()
    # through `rlhf model serve`, which puts the venv on PATH (mlflow execs uvicorn from it) and points at
    # the project's tracking store: neither comes from this environment
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p != str(Path(sys.executable).parent)
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "PATH": path,
        "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(SERVE_CONFIG),
    }
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    log_path = tmp_path_factory.mktemp("served") / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            rlhf,
            "model",
            "serve",
            "--alias",
            CHAMPION,
            "--port",
            str(port),
            "--share",
            "0.5",
            f"root={stages.root}",
            f"tracking.registered_model_name={NAME}",
            "registry.canary.poll_s=1",  # the canary test's alias changes reach the server within a second
        ],
        env=env,
        stdout=log,  # a file: a pipe nobody reads would fill with access lines and stall the server under load
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_serving(proc, port, log=log_path)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_mlflow_models_serve_answers_invocations(served):
    params = {"max_new_tokens": 8, "seed": 0}
    records = predictions(
        served, {"dataframe_records": [{"prompt": "The film was"}, {"prompt": "My new kettle"}], "params": params}
    )
    split = predictions(
        served,
        {"dataframe_split": {"columns": ["prompt"], "data": [["The film was"], ["My new kettle"]]}, "params": params},
    )
    plain = predictions(served, {"inputs": ["The film was", "My new kettle"], "params": params})
    for answer in (records, split, plain):
        rows = answer["predictions"]
        assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows), answer
        assert len({r.pop("trace_id") for r in rows}) == 2, "every answer its own trace"
    assert records == split == plain, "the same prompts and seed give the same text whatever the input format"
    edges = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0, "n": 8}  # every cap at its limit
    assert len(predictions(served, {"inputs": ["The film was"] * 4, "params": edges})["predictions"]) == 4
    best = predictions(served, ask(["The film was", "My new kettle"], n=4, seed=1, max_new_tokens=8))["predictions"]
    assert len(best) == 2 and all(isinstance(r["response"], str) and isinstance(r["score"], float) for r in best)


def ask(prompts, **params) -> dict:
    return {"inputs": prompts, **({"params": params} if params else {})}


BAD_REQUESTS = {  # id: (request, field, allowed)
    "blank prompt": (ask([""]), "prompt", "non-blank string"),
    "whitespace prompt": (ask(["The film was", "  "]), "prompt", "non-blank string"),
    "non-string prompt": ({"dataframe_records": [{"prompt": 7}]}, "prompt", "non-blank string"),
    "null prompt": ({"dataframe_split": {"columns": ["prompt"], "data": [[None]]}}, "prompt", "non-blank string"),
    "too many prompts": (ask(["The film was"] * 5), "prompt", "1..4"),
    "prompt too long": (ask(["The film was " * 15]), "prompt", "1..24 tokens"),
    "prompt too many characters": (ask(["x" * 201]), "prompt", "1..200 characters"),
    "max_new_tokens negative": (ask(["The film was"], max_new_tokens=-5), "max_new_tokens", "1..64"),
    "max_new_tokens over cap": (ask(["The film was"], max_new_tokens=65), "max_new_tokens", "1..64"),
    "temperature negative": (ask(["The film was"], temperature=-0.1), "temperature", "0.0..2.0"),
    "temperature too high": (ask(["The film was"], temperature=2.5), "temperature", "0.0..2.0"),
    "top_p zero": (ask(["The film was"], top_p=0.0), "top_p", "(0, 1]"),
    "top_p above one": (ask(["The film was"], top_p=1.5), "top_p", "(0, 1]"),
    "seed below -1": (ask(["The film was"], seed=-7), "seed", "-1..4294967295"),
    "n zero": (ask(["The film was"], n=0), "n", "1..8"),
    "n over cap": (ask(["The film was"], n=9), "n", "1..8"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clean_400(served, case):
    request, field, allowed = BAD_REQUESTS[case]
    status, text = post(served, request)
    assert status == 400, text
    body = json.loads(text)
    assert body["error_code"] == "INVALID_PARAMETER_VALUE" and body["field"] == field and body["allowed"] == allowed
    sentence = body["message"].rsplit("Error: ", 1)[-1]  # MLflow prefixes "Failed to predict data '...'. \nError: "
    assert field in sentence and allowed in sentence and sentence.count(". ") == 0, sentence
    assert "Traceback" not in text and not body.get("stack_trace"), text


def test_a_body_over_the_cap_gets_413_before_anything_parses_it(served):
    """Issue 28, item 7: max_body_bytes (4096 here) is held before MLflow's server reads the body into memory and
    parses it: declared by Content-Length, or streamed in chunks with none declared. The server stays up."""
    import http.client

    big = json.dumps(ask(["The film was " * 400])).encode()  # ~5 KB: over the 4096-byte cap
    status, text = post(served, json.loads(big))
    body = json.loads(text)
    assert status == 413 and body["field"] == "body" and body["allowed"] == "1..4096 bytes", text
    assert body["message"] == (
        f"The request body declares {len(big)} bytes, allowed 1..4096 bytes (serving limit max_body_bytes): "
        "send fewer or shorter prompts."
    )
    conn = http.client.HTTPConnection("127.0.0.1", served, timeout=60)
    conn.putrequest("POST", "/invocations")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for i in range(0, len(big), 1000):
            chunk = big[i : i + 1000]
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may answer and close before the last chunk
    streamed = conn.getresponse()
    assert streamed.status == 413, streamed.read()
    assert "sent more than 4096 bytes" in json.loads(streamed.read())["message"]
    conn.close()
    # within the cap, the same server answers as before
    assert len(predictions(served, ask(["The film was"], max_new_tokens=4, seed=0))["predictions"]) == 1


# 15 s in CI (the time budget: ~2,500 requests); RLHF_LOAD_S=60 is the full minute (measured: docs/operating.md, "Chaos")
LOAD_CLIENTS, LOAD_S = 8, float(os.environ.get("RLHF_LOAD_S", "15"))
RSS_BOUND_MB = 1024  # the serving process's resident memory, peak, under this load (measured: 582 -> 588 MB)
RSS_GROWTH_MB = 150  # from the first quarter of the load to its end: bad requests leave nothing behind


def test_under_load_the_server_stays_up_answers_bad_requests_in_one_sentence_and_holds_its_memory(served):
    """Issue 28, chaos and load: 8 clients for 15 s (RLHF_LOAD_S=60: a minute), each sending in turn a good request, a bad
    parameter, an oversized body and a malformed one. The server stays up, every good request is answered, every
    bad one gets a 4xx in one sentence, and its resident memory stays under RSS_BOUND_MB without growing."""
    import http.client
    import threading

    import psutil

    (pid,) = {
        c.pid for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == served
    }
    server = psutil.Process(pid)
    oversized = json.dumps(ask(["The film was " * 400]))
    bad = list(BAD_REQUESTS.values())
    malformed = ['{"inputs": ["The film was"', "not json at all", '{"inputs": 7}', "[]"]

    def raw(conn: http.client.HTTPConnection, body: str) -> tuple[int, str]:
        conn.request("POST", "/invocations", body=body.encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read().decode()

    results: list[tuple[str, int, str, float]] = []
    problems: list[str] = []
    stop = time.monotonic() + LOAD_S

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", served, timeout=120)
        k = i
        while time.monotonic() < stop:
            kind = ("good", "bad", "oversized", "malformed")[k % 4]
            if kind == "good":
                body = json.dumps(ask([f"Review {k}: the film was"], max_new_tokens=8, seed=k))
            elif kind == "bad":
                body = json.dumps(bad[k % len(bad)][0])
            else:
                body = oversized if kind == "oversized" else malformed[k % len(malformed)]
            t0 = time.monotonic()
            try:
                status, text = raw(conn, body)
            except (OSError, http.client.HTTPException) as e:  # the server closes after a 413: a new connection
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", served, timeout=120)
                if kind != "oversized":
                    problems.append(f"{kind}: {type(e).__name__}: {e}")
                k += 1
                continue
            results.append((kind, status, text, time.monotonic() - t0))
            k += 1
        conn.close()

    rss: list[float] = []
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(LOAD_CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(server.memory_info().rss / 2**20)
        time.sleep(0.5)
    for t in threads:
        t.join()

    assert server.is_running() and not problems, problems[:5]
    by_kind: dict[str, list[tuple[int, str, float]]] = {}
    for kind, status, text, took in results:
        by_kind.setdefault(kind, []).append((status, text, took))
    assert set(by_kind) == {"good", "bad", "oversized", "malformed"}, {k: len(v) for k, v in by_kind.items()}
    assert all(status == 200 for status, _, _ in by_kind["good"]), [r for r in by_kind["good"] if r[0] != 200][:3]
    for kind in ("bad", "oversized", "malformed"):
        for status, text, _ in by_kind[kind]:
            assert 400 <= status < 500, (kind, status, text[:300])
            message = json.loads(text)["message"]
            sentence = message.rsplit("Error: ", 1)[-1].strip()
            assert sentence.count(". ") == 0 and "Traceback" not in text, (kind, message)
    assert {s for s, _, _ in by_kind["oversized"]} == {413}
    quarter = rss[: max(1, len(rss) // 4)]
    assert max(rss) < RSS_BOUND_MB, f"peak RSS {max(rss):.0f} MB"
    assert rss[-1] - max(quarter) < RSS_GROWTH_MB, f"RSS grew {max(quarter):.0f} -> {rss[-1]:.0f} MB"
    good = sorted(took for _, _, took in by_kind["good"])
    print(
        f"{LOAD_CLIENTS} clients, {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{k} {len(v)}" for k, v in sorted(by_kind.items()))
        + f"; good p50 {good[len(good) // 2]:.2f} s, p95 {good[int(len(good) * 0.95)]:.2f} s; "
        f"RSS {rss[0]:.0f} -> peak {max(rss):.0f} MB"
    )


# ---- a served or registered policy as the guide of guided PPO (RLGF, issue 13) ----
def guided_ppo(stages, reward, guide: str, out):
    from dataclasses import replace

    from components.training.ppo import train_ppo

    ppo = stages.cfg.ppo
    cfg = replace(
        ppo,
        steps=2,
        batch_size=8,
        minibatch_size=4,
        eval_max_prompts=4,
        max_new_tokens=8,  # the served v1 takes prompts of 24 tokens at most: prompt (<= 13) + the policy's part
        guide=replace(ppo.guide, model=guide, rollin_prob=0.5, rollout_prob=0.5, max_rollin_tokens=4, request_batch=4),
    )
    return train_ppo(cfg, stages.cfg.model, stages.sft_dir, reward.head_dir, stages.cfg.data_path, out, seed=0)


def test_a_served_policy_guides_ppo_over_http(registry, served, reward, tmp_path):
    from dataclasses import replace

    from components.models.guide import GuideError, HTTPGuide

    stages, _ = registry
    url = f"http://127.0.0.1:{served}/invocations"
    result = guided_ppo(stages, reward, url, tmp_path / "ppo")
    for row in result.history:  # 4 roll-ins and (up to) 4 roll-outs of 8, written by the served model
        assert row["ppo/guide_rollin_share"] == 0.5 and 0.25 <= row["ppo/guide_rollout_share"] <= 0.5
        assert row["ppo/guide_tokens"] > 0 and "ppo/guided_score" in row
    cfg = replace(stages.cfg.ppo.guide, request_batch=4)  # the served v1 takes 4 prompts a request
    texts = HTTPGuide(url, url, cfg).complete(["The film was"] * 5, 4, seed=1)  # two requests: 4 + 1
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts)
    with pytest.raises(GuideError, match="answered HTTP 400: .*prompt"):  # the server's own sentence, passed on
        HTTPGuide(url, url, replace(cfg, request_batch=5)).complete(["The film was"] * 5, 4, seed=1)
    dead = f"http://127.0.0.1:{free_port()}/invocations"
    with pytest.raises(GuideError, match="did not answer .* after 2 tries"):
        HTTPGuide(dead, dead, cfg, attempts=2).complete(["The film was"], 4, seed=1)


def test_a_registered_policy_guides_ppo_by_model_uri(registry, served, reward, tmp_path):
    stages, (v1, _) = registry  # `served` promoted v1 to champion
    result = guided_ppo(stages, reward, f"models:/{NAME}@{CHAMPION}", tmp_path / "ppo")
    assert all(row["ppo/guide_tokens"] > 0 for row in result.history)


# ---- the loop from serving: traces, a person's feedback, and back into the data (issues 30, 38) ----
def test_served_answers_are_traced_judged_and_ingested_once_as_feedback(registry, served, prefect_server, capsys):
    """Each answer of `rlhf model serve` is a signed MLflow trace in the project's experiment (prompt, params,
    response, candidates and scores, model name, version and alias, latency) whose id the response carries. A rater
    with a token (`rlhf raters add`) judges 10 of 12 with `rlhf feedback` (a client of the app's POST /feedback), each
    right after its answer; bad calls are refused in one sentence. Forged: a trace written straight to the experiment
    with five votes, and a stuffed vote. `rlhf ingest --from-traces` lands exactly the 10 as validated feedback rows in
    a new data version and emits the event that triggers the served retrain; a second run changes nothing."""
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    from cli.main import main
    from components.data.schemas import read_jsonl, shard_files
    from components.data.versioning import data_version
    from flows.ingest import DATA_UPDATED
    from tests.flows.test_data_flows import wait_for_event

    stages, (v1, _) = registry  # `served` promoted v1 to champion
    from prefect.settings import PREFECT_API_URL

    project = [
        f"root={stages.root}",
        f"tracking.registered_model_name={NAME}",
        f"infra.prefect_api_url={PREFECT_API_URL.value()}",  # the session's server: the event lands where we look
    ]
    url = ["--url", f"http://127.0.0.1:{served}"]
    tokens = {}
    for name in ("alice", "mallory"):
        assert main(["raters", "add", name, *project]) == 0
        tokens[name] = capsys.readouterr().out.strip().splitlines()[-1]  # the token alone on the last line
    assert main(["raters", "revoke", "mallory", *project]) == 0

    ids = []
    for i in range(12):  # 12 requests, one prompt each (a request of k prompts is k traces)
        (row,) = predictions(served, ask([f"Review {i}: the film was"], max_new_tokens=8, seed=i, n=2))["predictions"]
        assert row["trace_id"].startswith("tr-") and isinstance(row["response"], str)
        ids.append(row["trace_id"])
        if i < 10:  # 10 judged at once, no wait for the trace export: 7 up (rated 4 or 5), 3 down
            vote, rating = ("down", ["--rating", "2"]) if i % 3 == 0 else ("up", ["--rating", str(4 + i % 2)])
            code = main(["feedback", row["trace_id"], vote, *rating, *url, "--token", tokens["alice"], *project])
            assert code == 0, capsys.readouterr().err
    assert len(set(ids)) == 12
    capsys.readouterr()
    for _ in range(3):  # stuffing: her repeated votes count once
        assert main(["feedback", ids[1], "up", "--rating", "5", *url, "--token", tokens["alice"], *project]) == 0
    for bad, says in (
        ([ids[10], "up", "--rating", "9"], "rating 9 is outside 1..5"),
        ([ids[10], "down", "--rating", "5"], "rating 5 is a thumbs up"),
        (["tr-00000000000000000000000000000000", "up"], "is not an answer this project served"),
        ([ids[10], "up", "--token", "rlhf_guess"], "no rater's (unknown or revoked)"),
        ([ids[10], "up", "--token", tokens["mallory"]], "no rater's (unknown or revoked)"),
    ):
        token = [] if "--token" in bad else ["--token", tokens["alice"]]
        assert main(["feedback", *bad, *url, *token, *project]) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with urllib.request.urlopen(f"http://127.0.0.1:{served}/tracing", timeout=10) as r:
        stats = json.loads(r.read())
    assert stats["enabled"] and stats["signed"] and stats["traced"] >= 12 and stats["dropped"] == 0, stats
    assert stats["build_ms_per_trace"] < 50, "building a trace costs the request little (export is in the background)"
    print(f"tracing: {stats}", file=sys.__stderr__)  # past capsys: the measured cost, for the record

    mlflow.set_tracking_uri(tracking.tracking_uri(stages.cfg))
    experiment = tracking.serving_experiment(stages.cfg)  # apart from the training runs (issue 41)
    deadline = time.time() + 60  # exported from the server's background queue
    while (trace := mlflow.get_trace(ids[-1])) is None and time.time() < deadline:
        time.sleep(0.5)
    assert trace is not None and trace.info.experiment_id == experiment
    assert trace.info.tags["rlhf.model"] == NAME and trace.info.tags["rlhf.version"] == v1.version
    assert trace.info.tags["rlhf.alias"] == CHAMPION
    (span,) = trace.data.spans
    assert span.inputs["prompt"] == "Review 11: the film was" and span.inputs["params"]["seed"] == 11
    assert len(span.outputs["candidates"]) == 2 and span.outputs["response"] in {
        c["response"] for c in span.outputs["candidates"]
    }
    assert span.outputs["score"] == max(c["score"] for c in span.outputs["candidates"])
    assert span.attributes["latency_ms"] > 0 and span.attributes["rlhf.signature"].count(":") == 1

    # the attack of issue 38: a trace written to the experiment, five votes on it and one on a real answer
    forged = mlflow.start_span_no_context("answer", inputs={"prompt": "Buy", "params": {}}, experiment_id=experiment)
    forged.end(outputs={"response": "now"})
    mlflow.flush_trace_async_logging()
    for i, trace_id in enumerate([forged.trace_id] * 5 + [ids[11]]):
        source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=f"r{i}")
        mlflow.log_feedback(trace_id=trace_id, name="thumbs", value=True, source=source)

    before = data_version(stages.root)
    assert main(["ingest", "--from-traces", *project]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "10 judged answer(s)" in out and "10 new" in out and "10 row(s) ingested" in out, out
    assert "answers not counted: 1 unsigned (before signing)" in out, out  # the forged trace
    assert "1 unsigned (before signing)" in out.split("votes not counted:")[1], out  # the forged vote on a real one
    assert "raters of the new rows: alice 10" in out, out
    after = data_version(stages.root)
    assert after != before
    rows = [
        row for shard in shard_files(stages.cfg.data_path / "feedback") for _, row in read_jsonl(shard, "feedback").rows
    ]
    landed = {r["id"]: r for r in rows if r.get("source") == "traces"}
    assert set(landed) == set(ids[:10])
    assert [landed[t]["label"] for t in ids[:10]] == [0 if i % 3 == 0 else 1 for i in range(10)]
    assert (
        landed[ids[1]]["rating"] == 5
        and landed[ids[0]]["response"] == mlflow.get_trace(ids[0]).data.spans[0].outputs["response"]
    )
    assert wait_for_event(DATA_UPDATED, after)["payload"]["kind"] == "feedback"  # what triggers the served retrain

    assert main(["ingest", "--from-traces", "--since", "2999-01-01", *project]) == 0  # nothing served after then
    assert "traces: 0 judged answer(s)" in capsys.readouterr().out
    assert main(["ingest", "--from-traces", *project]) == 0  # again: every judged answer is in the data already
    out = capsys.readouterr().out
    assert "10 already in the data" in out and "0 new" in out and "nothing to ingest" in out
    assert data_version(stages.root) == after


def test_a_canary_routes_sticky_users_to_the_challenger_and_counts_their_trusted_votes(registry, served, capsys):
    """`rlhf canary start 2` makes v2 the challenger of the running server (no restart): half the users (--share 0.5)
    get it, each user always the same arm (by "user" in the body or X-User), each prediction names its arm and
    version, and so does its trace. A rater's votes on one answer of each arm are what `rlhf canary status` counts;
    Moved to shadow, the challenger answers the same bodies unseen in traces of its own. `rlhf canary stop` takes the
    challenger out of traffic at the next poll."""
    from cli.main import main

    stages, (v1, v2) = registry
    project = [f"root={stages.root}", f"tracking.registered_model_name={NAME}"]
    assert main(["raters", "add", "carol", *project]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["canary", "start", v2.version, *project]) == 0, capsys.readouterr().err
    assert f"v{v2.version} is the challenger against champion v{v1.version}" in capsys.readouterr().out

    def answer(user: str, header: bool = False) -> dict:
        body = {"inputs": ["The film was"], "params": {"max_new_tokens": 4, "seed": 0}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{served}/invocations",
            data=json.dumps(body if header else {**body, "user": user}).encode(),
            headers={"Content-Type": "application/json", **({"X-User": user} if header else {})},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            (row,) = json.loads(r.read())["predictions"]
        return row

    users = [f"user-{i}" for i in range(24)]
    deadline = time.time() + 30
    while (first := {u: answer(u) for u in users[:6]}) and all(r["arm"] == CHAMPION for r in first.values()):
        assert time.time() < deadline, "the challenger never took traffic: the server did not re-read its aliases"
        time.sleep(0.5)
    rows = {u: answer(u) for u in users}
    assert all((r["arm"], r["version"]) in {(CHAMPION, v1.version), ("challenger", v2.version)} for r in rows.values())
    on_challenger = [u for u, r in rows.items() if r["arm"] == "challenger"]
    assert 3 <= len(on_challenger) <= 21, on_challenger  # half of 24 users, give or take
    for u in users[:8]:  # sticky, by body or by header
        assert answer(u)["arm"] == answer(u, header=True)["arm"] == rows[u]["arm"]
    status, text = post(served, {"inputs": ["The film was"], "user": 7})
    assert status == 400 and "user must be the app's end-user id" in text, text

    def vote(trace_id: str, up: bool) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{served}/feedback",
            data=json.dumps({"trace_id": trace_id, "value": up}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200

    champion_user = next(u for u in users if rows[u]["arm"] == CHAMPION)
    vote(rows[on_challenger[0]]["trace_id"], True)
    vote(rows[champion_user]["trace_id"], False)
    mlflow.set_tracking_uri(tracking.tracking_uri(stages.cfg))
    trace = mlflow.get_trace(rows[on_challenger[0]]["trace_id"])
    assert trace.info.tags["rlhf.arm"] == "challenger" and trace.data.spans[0].attributes["rlhf.version"] == v2.version
    assert main(["canary", "status", *project]) == 0
    out = capsys.readouterr().out
    assert f"challenger v{v2.version} against champion v{v1.version}" in out, out
    challenger_line = next(line for line in out.splitlines() if line.strip().startswith("challenger "))
    champion_line = next(line for line in out.splitlines() if line.strip().startswith("champion "))
    assert challenger_line.split()[3:5] == ["1", "1.000"] and champion_line.split()[3:5] == ["1", "0.000"], out
    assert "decision: continue: waiting for 50 judged answers per arm" in out, out

    # shadow (the canary's phase tag, read at the next poll): every user gets the champion's answer, and the
    # challenger answers the same body unseen, in a trace of its own
    from components.registry import canary as observed
    from components.registry.registry import tag_version

    tag_version(NAME, v2.version, {observed.PHASE: "shadow"})
    deadline = time.time() + 30
    while answer(on_challenger[0])["arm"] != CHAMPION:
        assert time.time() < deadline, "the server did not move the challenger to shadow"
        time.sleep(0.5)
    since_ms = int(time.time() * 1000)
    shown = answer(on_challenger[0])
    assert (shown["arm"], shown["version"]) == (CHAMPION, v1.version)
    deadline = time.time() + 30
    while not (
        shadows := [
            t
            for t in mlflow.search_traces(
                locations=[tracking.serving_experiment(stages.cfg)],
                filter_string=f"trace.timestamp_ms >= {since_ms}",
                return_type="list",
            )
            if t.info.tags.get("rlhf.arm") == "shadow"
        ]
    ):
        assert time.time() < deadline, "the challenger's shadow answer was never traced"
        time.sleep(0.5)
    assert shadows[0].data.spans[0].attributes["rlhf.version"] == v2.version
    assert shadows[0].info.trace_id != shown["trace_id"]

    assert main(["canary", "stop", *project]) == 0
    assert "retired" in capsys.readouterr().out
    deadline = time.time() + 30
    while answer(on_challenger[0])["arm"] != CHAMPION:
        assert time.time() < deadline, "the retired challenger still answers"
        time.sleep(0.5)
    assert all(answer(u)["arm"] == CHAMPION for u in on_challenger)


def test_the_canary_scores_both_arms_with_the_champions_reward_model(registry):
    """The reward guardrail's yardstick: the champion's bundled reward model (v1 has one, v2 none), loaded from the
    registry once, scores any arm's answers as the champion scores its own (its `score` column); a failed answer is
    left unscored."""
    from components.evaluation.guardrails import Answer
    from components.registry.canary import champion_scorer, scored

    stages, (v1, v2) = registry
    mlflow.set_tracking_uri(tracking.tracking_uri(stages.cfg))
    assert champion_scorer(NAME, v2.version) is None
    scorer = champion_scorer(NAME, v1.version)
    assert champion_scorer(NAME, v1.version) is scorer, "loaded once"
    own = mlflow.pyfunc.load_model(f"models:/{NAME}/{v1.version}").predict(
        ["The film was", "My new kettle"], params={"max_new_tokens": 8, "seed": 3}
    )
    answers = [
        Answer(r, 10.0, prompt=p) for p, r in zip(["The film was", "My new kettle"], own["response"], strict=True)
    ]
    rewards = [a.reward for a in scored(scorer, [*answers, Answer("", 10.0, failed=True, prompt="x")])]
    assert rewards[:2] == pytest.approx(own["score"].tolist(), abs=1e-4) and rewards[2] is None


def test_two_models_on_one_base_load_it_once_and_answer_as_alone(registry, monkeypatch):
    """RLHF_SHARE_BASE=1 (a canary's serving process): a second model whose base weights are the same content adds
    its adapters to the first one's base instead of loading another copy, and answers exactly as it does alone (seeded
    sampling and best-of-n scores); released, its adapters leave the base and the other model goes on."""
    stages, (v1, _) = registry
    mlflow.set_tracking_uri(tracking.tracking_uri(stages.cfg))
    uri = f"models:/{NAME}/{v1.version}"
    params = {"max_new_tokens": 8, "seed": 5, "n": 2}
    unshared = mlflow.pyfunc.load_model(uri)
    alone = unshared.predict(["The film was", "My new kettle"], params=params)
    alone_one = unshared.predict(["The film was"], params=params)
    monkeypatch.setenv("RLHF_SHARE_BASE", "1")
    a, b = mlflow.pyfunc.load_model(uri), mlflow.pyfunc.load_model(uri)
    pa, pb = a.unwrap_python_model(), b.unwrap_python_model()
    assert pa.model is pb.model and pa.lock is pb.lock and pa.reward_name != pb.reward_name
    for model in (b, a):
        got = model.predict(["The film was", "My new kettle"], params=params)
        assert got["response"].tolist() == alone["response"].tolist()
        assert got["score"].tolist() == pytest.approx(alone["score"].tolist(), abs=1e-5)
    pb.release()
    assert pb.reward_name not in pa.model.peft_config and pa.reward_name in pa.model.peft_config
    assert a.predict(["The film was"], params=params)["response"].tolist() == alone_one["response"].tolist()
    pa.release()
