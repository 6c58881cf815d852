"""Teacher faults: `qponder distill` through a proxy that breaks 30 % of the requests to the real
`mlx_vlm.server` (tiny model). Every sample must end kept, rejected or failed with the reason the
proxy's log predicts; retries stay within --max-retries; time stays within the bound the
timeouts and back-offs allow; the API key never shows up in any output."""

from __future__ import annotations

import json
import math
import random
import time

import pytest
from distill_server import write_index_image
from qponder_mlx.cli.main import app
from reliability.procs import served
from reliability.proxy import FAULTS, TRANSIENT, Entry, FaultProxy
from typer.testing import CliRunner

from qponder_mlx.io import read_jsonl
from qponder_mlx.prompts import parse_response

KEY_ENV = "QPONDER_RELIABILITY_TEACHER_KEY"
N_SAMPLES = 24
SEED = 33  # a seed whose schedule hits every fault kind at least once (asserted below)
SETTINGS = {"max_retries": 3, "backoff_s": 0.2, "max_backoff_s": 0.5, "timeout_s": 5.0,
            "concurrency": 3, "max_tokens": 16, "temperature": 0.0}
STALL_S = 6.0  # > timeout_s


def expected(entries: list[Entry], max_retries: int) -> tuple[str, str]:
    """(status, code) the proxy's log implies for one sample, from first principles: transient
    faults are retried until the tries run out; anything else ends the attempt."""
    for e in entries:
        if e.fault in TRANSIENT:
            continue
        if e.fault == "truncated_json":
            return "failed", "malformed"
        if e.fault == "empty_content":
            return "rejected", "empty"
        if e.fault == "wrong_format":
            return "rejected", "bad_format"
        text = e.upstream_content or ""
        if not text.strip():
            return "rejected", "empty"
        if not parse_response(text).format_ok:
            return "rejected", "bad_format"
        return "kept_or_judged", ""  # a well-formed answer: judged on reasoning and score
    assert len(entries) == max_retries + 1, "gave up before the tries ran out"
    return "failed", TRANSIENT[entries[-1].fault]


@pytest.fixture(scope="module")
def real_server(tiny_model_dir, tmp_path_factory):
    with served(tiny_model_dir, tmp_path_factory.mktemp("mlx_server")) as srv:
        yield srv


def test_distill_survives_30_percent_mixed_faults(real_server, tmp_path):
    srv = real_server
    data = tmp_path / "data"
    data.mkdir()
    with (data / "labels.jsonl").open("w") as f:
        for i in range(N_SAMPLES):
            write_index_image(data / f"img_{i:02d}.png", i)
            f.write(json.dumps({"image": f"img_{i:02d}.png", "mos": 3.0, "id": f"s{i:02d}"})
                    + "\n")
    config = tmp_path / "distill.toml"
    config.write_text("[distill]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in SETTINGS.items()))
    out = tmp_path / "out" / "d.jsonl"

    with FaultProxy(srv["url"], rate=0.3, seed=SEED, stall_s=STALL_S) as proxy:
        t0 = time.monotonic()
        result = CliRunner().invoke(app, [
            "distill", "--data", str(data / "labels.jsonl"), "--out", str(out),
            "--teacher-url", proxy.url, "--teacher-model", srv["model"],
            "--api-key-env", KEY_ENV, "--config", str(config)], env={KEY_ENV: srv["key"]})
        wall = time.monotonic() - t0
        log = result.output  # stdout and stderr, interleaved
        entries = {i: proxy.entries(i) for i in range(N_SAMPLES)}
    assert result.exit_code == 0, log

    # The schedule really is a 30 % mix of every fault kind.
    requests = [e for es in entries.values() for e in es]
    faulted = [e for e in requests if e.fault]
    assert {e.fault for e in faulted} == set(FAULTS), "pick a SEED that hits every fault"
    assert 0.2 <= len(faulted) / len(requests) <= 0.45, (len(faulted), len(requests))

    kept = {r["id"]: r for r in read_jsonl(out)}
    dropped = {r["id"]: r for r in read_jsonl(out.with_name("d.rejected.jsonl"))}
    summary = json.loads(out.with_name("d.summary.json").read_text())
    assert not set(kept) & set(dropped) and len(kept) + len(dropped) == N_SAMPLES
    assert summary["total"] == N_SAMPLES

    max_retries = SETTINGS["max_retries"]
    backoff_cap = max(SETTINGS["max_backoff_s"], 1.1 * 1.0)  # Retry-After: 1, plus 10 % jitter
    per_sample_bound = ((max_retries + 1) * SETTINGS["timeout_s"] + max_retries * backoff_cap)
    for i, es in entries.items():
        sid = f"s{i:02d}"
        assert 1 <= len(es) <= max_retries + 1, f"{sid}: {len(es)} requests"  # retries bounded
        status, code = expected(es, max_retries)
        row = kept.get(sid) or dropped[sid]
        if status == "kept_or_judged":
            assert sid in kept or row["code"] in ("no_reasoning", "score_error"), row
            continue
        assert row["status"] == status and row["code"] == code, (sid, [e.fault for e in es], row)
        assert row["reason"], row  # a human-readable reason, not just a code
        detail = row["attempt_details"][0]
        assert detail["retries"] == len(es) - 1, (sid, detail)
        span = es[-1].t - es[0].t
        assert span <= per_sample_bound, (sid, span)  # each sample's time is bounded

    waves = math.ceil(N_SAMPLES / SETTINGS["concurrency"])
    assert wall <= waves * per_sample_bound + 30, wall  # and so is the whole run's
    # 500s echo the Authorization header: a sample that ended on one carries it scrubbed.
    for r in dropped.values():
        if r["code"] == "http_500":
            assert "Bearer ***" in r["reason"], r
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert srv["key"].encode() not in p.read_bytes(), f"API key in {p}"
    assert srv["key"] not in log
    # Reported for docs/reliability.md (pytest -s shows it).
    print(f"\nfault run: {len(requests)} requests, {len(faulted)} faulted "
          f"({len(faulted) / len(requests):.0%}: "
          + ", ".join(f"{k} {sum(e.fault == k for e in faulted)}" for k in FAULTS)
          + f"); kept {len(kept)}, rejected {summary['rejected']}, failed {summary['failed']}; "
          f"reasons {summary['reasons']}; {wall:.1f} s (bound "
          f"{waves * per_sample_bound + 30:.0f} s)")


def test_proxy_schedule_is_independent_of_interleaving():
    a, b = FaultProxy("http://127.0.0.1:9", seed=SEED), FaultProxy("http://127.0.0.1:9", seed=SEED)
    try:
        order = [(i, n) for i in range(N_SAMPLES) for n in range(4)]
        first = [a.decide(i, n) for i, n in order]
        random.Random(0).shuffle(order)
        second = dict(zip(order, [b.decide(i, n) for i, n in order]))
        assert first == [second[(i, n)] for i in range(N_SAMPLES) for n in range(4)]
    finally:
        for p in (a, b):
            p._httpd.server_close()
