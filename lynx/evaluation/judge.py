"""Judge metrics (PF, AQ, MN, VQ): a multimodal model scores sampled frames of a video against its prompt.

The paper scored prompt following, aesthetic quality, motion naturalness and overall video quality with
Gemini-2.5-Pro. Here one request per metric sends the metric's rubric (``rubrics/*.md``, kept in the
repository so the prompts are versioned) with N frames sampled evenly in time, to Gemini's
``generateContent`` API or to any OpenAI-compatible ``/chat/completions`` endpoint. The answer must be a
JSON object ``{"score": 0..1, "reason": "..."}``; anything else is rejected and asked again. Failed
requests are retried with exponential backoff (honouring ``Retry-After``). Results are cached per video
keyed by model, rubric, prompt and frames, so re-running a benchmark never pays twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LynxError

log = logging.getLogger("lynx.evaluation")

METRICS = {"PF": "prompt_following", "AQ": "aesthetic_quality", "MN": "motion_naturalness",
           "VQ": "video_quality"}
RUBRIC_DIR = Path(__file__).with_name("rubrics")
PROVIDERS = {
    "gemini": {"url": "https://generativelanguage.googleapis.com/v1beta", "key_env": "GEMINI_API_KEY"},
    "openai": {"url": "https://api.openai.com/v1", "key_env": "OPENAI_API_KEY"},
}
# Transient by nature: rate limits, overload, gateway trouble. Other 4xx mean the request itself is wrong.
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}


class JudgeError(LynxError):
    """The judge could not produce a score (no endpoint configured, request refused, or no valid answer)."""


class JudgeAnswerError(JudgeError):
    """The judge answered, but not with the JSON score the rubric asks for."""


def rubric(metric: str) -> str:
    """The rubric text of a metric (PF, AQ, MN, VQ) followed by the common answer format."""
    if metric not in METRICS:
        raise JudgeError(f"unknown judge metric {metric!r}; choose from {', '.join(METRICS)}")
    path = RUBRIC_DIR / f"{METRICS[metric]}.md"
    try:
        return path.read_text().strip() + "\n\n" + (RUBRIC_DIR / "answer_format.md").read_text().strip()
    except OSError as exc:
        raise JudgeError(f"rubric file {path} is missing from the installation ({exc})") from exc


def render_rubric(metric: str, prompt: str, num_frames: int, seconds: float | None) -> str:
    duration = f"{seconds:.1f}-second" if seconds else "short"
    # str.replace, not format(): the JSON example in the answer format has braces.
    return (rubric(metric).replace("{prompt}", prompt.strip()).replace("{num_frames}", str(num_frames))
            .replace("{duration}", duration))


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_answer(text: str) -> tuple[float, str]:
    """The judge's reply -> (score in [0, 1], reason). Strict: one JSON object, a number score, nothing else."""
    if not isinstance(text, str) or not text.strip():
        raise JudgeAnswerError("empty answer")
    body = text.strip()
    m = _FENCE.match(body)
    if m:  # models often wrap JSON in a markdown fence even when told not to; the content must still be exact
        body = m.group(1)
    try:
        obj = json.loads(body)
    except ValueError:
        raise JudgeAnswerError(f"answer is not a JSON object: {text.strip()[:120]!r}") from None
    if not isinstance(obj, dict) or "score" not in obj:
        raise JudgeAnswerError(f"answer has no \"score\": {text.strip()[:120]!r}")
    extra = set(obj) - {"score", "reason"}
    if extra:
        raise JudgeAnswerError(f"answer has unexpected keys {sorted(extra)}")
    score = obj["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise JudgeAnswerError(f"score must be a number, got {score!r}")
    if not 0.0 <= score <= 1.0:
        raise JudgeAnswerError(f"score {score} is outside 0..1")
    reason = obj.get("reason", "")
    if not isinstance(reason, str):
        raise JudgeAnswerError("reason must be a string")
    return float(score), reason.strip()


def sample_frames(frames: np.ndarray, n: int) -> tuple[list[int], np.ndarray]:
    """n frame indices spread evenly from the first to the last frame, and those frames."""
    total = len(frames)
    idx = sorted(set(np.round(np.linspace(0, total - 1, min(n, total))).astype(int).tolist()))
    return idx, frames[idx]


def encode_jpeg(frame: np.ndarray, max_side: int = 512, quality: int = 90) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class JudgeConfig:
    """Where and how to ask. `api_key_env` names the environment variable holding the key (never the key)."""

    provider: str = "gemini"
    model: str = "gemini-2.5-pro"
    url: str | None = None
    api_key_env: str | None = None
    num_frames: int = 8
    max_side: int = 512
    timeout: float = 120.0
    max_attempts: int = 5
    backoff: float = 2.0  # first wait in seconds; doubled each retry, with jitter
    max_backoff: float = 60.0
    temperature: float = 0.0
    metrics: tuple[str, ...] = tuple(METRICS)

    @classmethod
    def from_spec(cls, spec: str | None = None, url: str | None = None, api_key_env: str | None = None,
                  **kw) -> "JudgeConfig":
        """`gemini:MODEL` / `openai:MODEL`, else $LYNX_JUDGE; url and key variable also from $LYNX_JUDGE_URL,
        $LYNX_JUDGE_KEY_ENV. Raises JudgeError saying how to configure one when nothing is set."""
        spec = spec or os.environ.get("LYNX_JUDGE")
        if not spec:
            raise JudgeError(
                "no judge endpoint configured: pass --judge gemini:gemini-2.5-pro (key in $GEMINI_API_KEY) or "
                "--judge openai:MODEL [--judge-url URL] (key in $OPENAI_API_KEY), or set LYNX_JUDGE the same way")
        provider, _, model = spec.partition(":")
        if provider not in PROVIDERS or not model:
            raise JudgeError(f"judge {spec!r}: expected gemini:MODEL or openai:MODEL (OpenAI-compatible endpoint)")
        return cls(provider=provider, model=model, url=url or os.environ.get("LYNX_JUDGE_URL"),
                   api_key_env=api_key_env or os.environ.get("LYNX_JUDGE_KEY_ENV"), **kw)


class Judge:
    """Scores videos with a multimodal model over HTTP; see the module docstring."""

    def __init__(self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        if config.provider not in PROVIDERS:
            raise JudgeError(f"unknown judge provider {config.provider!r}; use gemini or openai")
        self.config = config
        defaults = PROVIDERS[config.provider]
        self.url = (config.url or defaults["url"]).rstrip("/")
        key_env = config.api_key_env or defaults["key_env"]
        self.api_key = os.environ.get(key_env) or None
        if self.api_key is None and config.url is None:
            raise JudgeError(f"the {config.provider} judge needs an API key in ${key_env} (or name another "
                             f"variable with --judge-key-env); none is set")
        # A self-hosted endpoint given by URL may need no key; then no auth header is sent.
        self.key_env = key_env
        self._sleep = sleep
        for m in config.metrics:
            rubric(m)  # fail now, not after the first video, when a rubric file is missing

    # ----------------------------------------------------------------------------------- requests
    def _request_body(self, text: str, images: list[bytes]) -> tuple[str, dict, dict]:
        c = self.config
        headers = {"Content-Type": "application/json"}
        if c.provider == "gemini":
            parts = [{"text": text}] + [{"inline_data": {"mime_type": "image/jpeg",
                                                         "data": base64.b64encode(b).decode()}} for b in images]
            body = {"contents": [{"role": "user", "parts": parts}],
                    "generationConfig": {"temperature": c.temperature, "responseMimeType": "application/json"}}
            if self.api_key:
                headers["x-goog-api-key"] = self.api_key
            return f"{self.url}/models/{c.model}:generateContent", body, headers
        content = [{"type": "text", "text": text}] + [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(b).decode()}}
            for b in images]
        body = {"model": c.model, "temperature": c.temperature,
                "messages": [{"role": "user", "content": content}]}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return f"{self.url}/chat/completions", body, headers

    def _answer_text(self, reply: dict) -> str:
        try:
            if self.config.provider == "gemini":
                cand = reply["candidates"][0]
                return "".join(p.get("text", "") for p in cand["content"]["parts"])
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            why = reply.get("promptFeedback") or reply.get("error") if isinstance(reply, dict) else None
            raise JudgeAnswerError(f"reply has no answer text{f' ({why})' if why else ''}: "
                                   f"{json.dumps(reply)[:200]}") from None

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        c = self.config
        delay = c.backoff * (2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        self._sleep(min(delay, c.max_backoff))

    def ask(self, text: str, images: list[bytes]) -> tuple[float, str, int]:
        """One metric: send, retry on transient failures and invalid answers; (score, reason, attempts)."""
        url, body, headers = self._request_body(text, images)
        data = json.dumps(body).encode()
        last = "no attempt made"
        for attempt in range(1, self.config.max_attempts + 1):
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                    reply = json.loads(resp.read().decode("utf-8"))
                score, reason = parse_answer(self._answer_text(reply))
                return score, reason, attempt
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {exc.code} from {url}: {detail}"
                if exc.code not in RETRY_STATUS:
                    hint = f" (check ${self.key_env})" if exc.code in (401, 403) else ""
                    raise JudgeError(last + hint) from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"cannot reach {url}: {getattr(exc, 'reason', exc)}"
            except JudgeAnswerError as exc:
                last = f"invalid answer: {exc}"
            except ValueError as exc:  # a reply body that is not JSON
                last = f"reply from {url} is not JSON: {exc}"
            log.info("judge attempt %d/%d failed: %s", attempt, self.config.max_attempts, last)
            if attempt < self.config.max_attempts:
                self._wait(attempt, retry_after)
        raise JudgeError(f"no valid judge answer after {self.config.max_attempts} attempts; last: {last}")

    # ----------------------------------------------------------------------------------- videos
    def score(self, frames, prompt: str, *, fps: float = 0.0, cache_path=None) -> dict:
        """{"scores": {metric: {"score", "reason", ...}}, "errors": {metric: message}} for one video.

        With `cache_path`, metrics already answered for the same model, rubric, prompt and frames are read
        from it, and new answers are added to it; failures are not cached, so a re-run asks again.
        """
        from ..io.video import to_uint8

        frames = to_uint8(frames)
        c = self.config
        idx, picked = sample_frames(frames, c.num_frames)
        images = [encode_jpeg(f, c.max_side) for f in picked]
        seconds = len(frames) / fps if fps else None
        frames_hash = hashlib.sha256(b"".join(images)).hexdigest()
        cache_path = Path(cache_path) if cache_path is not None else None
        cache = {}
        if cache_path is not None and cache_path.is_file():
            try:
                cache = json.loads(cache_path.read_text()).get("scores", {})
            except (OSError, ValueError):
                cache = {}
        scores, errors = {}, {}
        for metric in c.metrics:
            text = render_rubric(metric, prompt, len(images), seconds)
            key = hashlib.sha256(json.dumps([c.provider, c.model, c.temperature, text, frames_hash]).encode()
                                 ).hexdigest()
            hit = cache.get(metric)
            if hit and hit.get("key") == key:
                scores[metric] = hit
                continue
            try:
                score, reason, attempts = self.ask(text, images)
            except JudgeError as exc:
                errors[metric] = str(exc)
                continue
            scores[metric] = {"score": score, "reason": reason, "key": key, "model": f"{c.provider}:{c.model}",
                              "frames": idx, "attempts": attempts}
            if cache_path is not None:
                self._save(cache_path, scores, errors)
        if cache_path is not None:
            self._save(cache_path, scores, errors)
        return {"scores": scores, "errors": errors}

    @staticmethod
    def _save(path: Path, scores: dict, errors: dict) -> None:
        from ..io.files import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"scores": scores, "errors": errors}, indent=2)))
