"""A loopback HTTP server that answers like Gemini's generateContent and OpenAI's chat/completions, for tests.

It binds 127.0.0.1 on a free port, records every request, and answers from a per-test script; a score per
metric is picked from the rubric text in the request so tests can check which answer went where.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCORES = {"PROMPT FOLLOWING": 0.75, "AESTHETIC QUALITY": 0.5, "MOTION NATURALNESS": 0.25, "VIDEO QUALITY": 1.0}


def metric_score(text: str) -> float:
    for name, score in SCORES.items():
        if name in text:
            return score
    raise AssertionError(f"request text names no known rubric: {text[:80]!r}")


def gemini_reply(text: str) -> dict:
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
            "modelVersion": "gemini-2.5-pro"}


def openai_reply(text: str) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


class JudgeServer:
    """`script` is a list of (status, headers, text-or-None) consumed one per request; once empty, every
    request gets a valid answer with the score of its rubric."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple[int, dict, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append({"path": self.path, "headers": headers, "body": body})
                if "generateContent" in self.path:
                    text = body["contents"][0]["parts"][0]["text"]
                    wrap = gemini_reply
                else:
                    text = body["messages"][0]["content"][0]["text"]
                    wrap = openai_reply
                status, headers, answer = server.script.pop(0) if server.script else (200, {}, None)
                if answer is None:
                    answer = json.dumps({"score": metric_score(text), "reason": "as scripted"})
                payload = json.dumps(wrap(answer) if status == 200 else {"error": {"code": status,
                                                                                     "message": answer}}).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
