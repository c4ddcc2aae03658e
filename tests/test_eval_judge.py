"""The judge client against a loopback server that answers in Gemini's and OpenAI's formats: request
layout, strict answer parsing, retries with backoff, caching, and the error when nothing is configured."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from eval_judge_server import SCORES, JudgeServer

from lynx.evaluation.judge import METRICS, Judge, JudgeAnswerError, JudgeConfig, JudgeError, parse_answer, render_rubric

WANT = {"PF": 0.75, "AQ": 0.5, "MN": 0.25, "VQ": 1.0}


@pytest.fixture
def server():
    with JudgeServer() as s:
        yield s


@pytest.fixture
def frames():
    rng = np.random.RandomState(0)
    return rng.randint(0, 255, (20, 48, 64, 3), dtype=np.uint8)


def _judge(server, provider="gemini", sleeps=None, **kw):
    url = server.url + ("/v1beta" if provider == "gemini" else "/v1")
    cfg = JudgeConfig(provider=provider, model="gemini-2.5-pro" if provider == "gemini" else "test-model",
                      url=url, timeout=5, **{"max_attempts": 4, "backoff": 1.0, **kw})
    return Judge(cfg, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_gemini_requests_answers_and_cache(server, frames, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    judge = _judge(server)
    cache = tmp_path / "judge" / "case.json"
    out = judge.score(frames, "a person walks on the beach", fps=16, cache_path=cache)
    assert out["errors"] == {}
    assert {m: v["score"] for m, v in out["scores"].items()} == WANT
    assert len(server.requests) == 4
    for req in server.requests:
        assert req["path"] == "/v1beta/models/gemini-2.5-pro:generateContent"
        assert req["headers"]["x-goog-api-key"] == "test-key"
        parts = req["body"]["contents"][0]["parts"]
        assert "a person walks on the beach" in parts[0]["text"] and "1.2-second" in parts[0]["text"]
        images = [p["inline_data"] for p in parts[1:]]
        assert len(images) == 8 and all(i["mime_type"] == "image/jpeg" for i in images)
        assert all(base64.b64decode(i["data"])[:2] == b"\xff\xd8" for i in images)
        assert req["body"]["generationConfig"]["temperature"] == 0
    assert out["scores"]["PF"]["frames"] == [0, 3, 5, 8, 11, 14, 16, 19]
    # Cached: the same video and prompt cost no request; another prompt asks again.
    again = judge.score(frames, "a person walks on the beach", fps=16, cache_path=cache)
    assert len(server.requests) == 4 and again["scores"] == out["scores"]
    assert json.loads(cache.read_text())["scores"]["MN"]["score"] == 0.25
    judge.score(frames, "a man dancing in rain", fps=16, cache_path=cache)
    assert len(server.requests) == 8


def test_openai_compatible_endpoint(server, frames, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-local")
    judge = Judge(JudgeConfig.from_spec("openai:test-model", url=server.url + "/v1", api_key_env="MY_KEY",
                                        num_frames=3, timeout=5))
    out = judge.score(frames, "close up portrait, talking")
    assert {m: v["score"] for m, v in out["scores"].items()} == WANT
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["authorization"] == "Bearer sk-local"
    content = req["body"]["messages"][0]["content"]
    assert req["body"]["model"] == "test-model" and content[0]["type"] == "text"
    assert [c["type"] for c in content[1:]] == ["image_url"] * 3
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_retries_with_backoff_on_rate_limits_errors_and_bad_answers(server, frames, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    sleeps = []
    judge = _judge(server, sleeps=sleeps, metrics=("PF",))
    server.script = [(429, {"Retry-After": "7"}, "slow down"), (503, {}, "overloaded"),
                     (200, {}, "I would rate this 4/5.")]
    out = judge.score(frames, "a person walks on the beach")
    assert out["scores"]["PF"]["score"] == 0.75 and out["scores"]["PF"]["attempts"] == 4
    assert len(server.requests) == 4
    assert sleeps[0] >= 7  # Retry-After is honoured
    assert 1.0 <= sleeps[1] <= 2.0 and 2.0 <= sleeps[2] <= 4.0  # exponential with jitter


def test_gives_up_with_a_clear_error(server, frames, monkeypatch, tmp_path):
    monkeypatch.setenv("GEMINI_API_KEY", "wrong")
    judge = _judge(server, metrics=("PF", "VQ"))
    server.script = [(401, {}, "API key not valid")]
    cache = tmp_path / "c.json"
    out = judge.score(frames, "a prompt", cache_path=cache)
    assert "HTTP 401" in out["errors"]["PF"] and "GEMINI_API_KEY" in out["errors"]["PF"]
    assert out["scores"]["VQ"]["score"] == 1.0 and "PF" not in out["scores"]
    assert len(server.requests) == 2  # a refused key is not retried
    server.script = [(200, {}, '{"score": 7}')] * 4
    with pytest.raises(JudgeError, match="after 4 attempts.*outside 0..1"):
        judge.ask("PROMPT FOLLOWING", [])
    # The failure was not cached: asking again reaches the server and fills the gap.
    n = len(server.requests)
    out = judge.score(frames, "a prompt", cache_path=cache)
    assert out["scores"]["PF"]["score"] == 0.75 and len(server.requests) == n + 1


def test_unreachable_endpoint_is_retried_then_reported(frames, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    sleeps = []
    judge = Judge(JudgeConfig(provider="openai", model="m", url=f"http://127.0.0.1:{port}/v1", timeout=2,
                              max_attempts=2, metrics=("AQ",)), sleep=sleeps.append)
    out = judge.score(frames, "x")
    assert "cannot reach" in out["errors"]["AQ"] and len(sleeps) == 1


@pytest.mark.parametrize("text,score", [('{"score": 0.7, "reason": "fine"}', 0.7), ('{"score": 1}', 1.0),
                                        ('```json\n{"score": 0, "reason": "bad"}\n```', 0.0)])
def test_parse_answer_accepts_only_the_asked_form(text, score):
    assert parse_answer(text)[0] == score


@pytest.mark.parametrize("text", ["0.7", '{"score": "0.7"}', '{"score": 1.2}', '{"score": -0.1}', '{"score": true}',
                                  '{"score": 0.5, "confidence": 1}', 'Sure! {"score": 0.5}', '{"score": NaN}',
                                  '{"reason": "no score"}', "", '[0.5]', '{"score": 0.5, "reason": 3}'])
def test_parse_answer_rejects_everything_else(text):
    with pytest.raises(JudgeAnswerError):
        parse_answer(text)


def test_no_endpoint_configured_is_a_clear_error(monkeypatch, tmp_path, capsys):
    for var in ("LYNX_JUDGE", "LYNX_JUDGE_URL", "LYNX_JUDGE_KEY_ENV", "GEMINI_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(JudgeError, match="no judge endpoint configured"):
        JudgeConfig.from_spec(None)
    with pytest.raises(JudgeError, match="GEMINI_API_KEY"):
        Judge(JudgeConfig.from_spec("gemini:gemini-2.5-pro"))
    with pytest.raises(JudgeError, match="gemini:MODEL or openai:MODEL"):
        JudgeConfig.from_spec("claude")
    from lynx.apps.cli import main

    (tmp_path / "m.yaml").write_text("subjects: [{id: a, embedding: e.npy}]\nprompts: [hello]\n")
    np.save(tmp_path / "e.npy", np.ones(512, np.float32))
    assert main(["bench", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o"), "--only", "judge"]) == 2
    assert "no judge endpoint configured" in capsys.readouterr().err


def test_rubrics_are_stored_and_filled_in():
    for metric in METRICS:
        text = render_rubric(metric, "a cat on a sofa", 8, 5.06)
        assert "a cat on a sofa" in text and "8 frames" in text and "5.1-second" in text
        assert '{"score": S, "reason"' in text and "{prompt}" not in text
    assert set(SCORES) == {"PROMPT FOLLOWING", "AESTHETIC QUALITY", "MOTION NATURALNESS", "VIDEO QUALITY"}
