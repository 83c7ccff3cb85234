"""Replies from an OpenAI-compatible server (`vllm serve` on another allocation): bounded
concurrency, retries with exponential backoff, a per-request timeout sized for long traces.
A request that fails all its tries comes back as finish_reason "timeout" or "error", so its
question stays undone (counted, asked again by the next run), never silently dropped."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ..utils.atomic import log
from .backends import Reply, Request


class ServerUnreachable(ValueError):
    pass


class ServerBackend:
    def __init__(self, url: str, concurrency: int = 32, timeout: float = 3600.0, retries: int = 4,
                 backoff_s: float = 2.0, model: str | None = None):
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.concurrency, self.timeout, self.retries, self.backoff_s = concurrency, timeout, retries, backoff_s
        self.model = model or self._served_model()
        self.name = self.model.rstrip("/").rsplit("/", 1)[-1]

    def _served_model(self) -> str:
        last = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=30) as r:
                    return json.load(r)["data"][0]["id"]
            except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as err:
                last = err
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** attempt)
        raise ServerUnreachable(f"--server {self.url}: no model list at {self.url}/v1/models after "
                                f"{self.retries + 1} tries ({getattr(last, 'reason', last)}); is `vllm serve` "
                                "running there and reachable from this node?")

    def _body(self, request: Request) -> dict:
        p = dict(request.params)
        body = {"model": self.model, "messages": request.messages, "return_token_ids": True,
                "chat_template_kwargs": {"enable_thinking": request.thinking},
                "skip_special_tokens": True, "include_stop_str_in_output": False}
        body.update(p)
        return body

    def _one(self, request: Request) -> Reply:
        data = json.dumps(self._body(request)).encode()
        reason = "error"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    out = json.load(r)
                choice = out["choices"][0]
                message = choice["message"]
                reasoning = message.get("reasoning") or message.get("reasoning_content")
                text = message.get("content") or ""
                if reasoning:  # a server with a reasoning parser splits the reply itself
                    text = f"<think>\n{reasoning}\n</think>\n\n{text}"
                return Reply(request.key, text, choice.get("finish_reason") or "unknown",
                             out.get("usage", {}).get("completion_tokens", 0), out.get("prompt_token_ids") or [])
            except urllib.error.HTTPError as err:
                if 400 <= err.code < 500 and err.code != 429:  # the request itself is refused: no retry
                    log.warning("%s: HTTP %d for %s: %s", self.url, err.code, request.key, err.read()[:300])
                    return Reply(request.key, "", "error")
                reason = "error"
            except (TimeoutError, OSError, urllib.error.URLError) as err:
                reason = "timeout" if "timed out" in str(err) or isinstance(err, TimeoutError) else "error"
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        log.warning("%s: %s after %d tries for %s; the question stays undone", self.url, reason,
                    self.retries + 1, request.key)
        return Reply(request.key, "", reason)

    def generate(self, requests: list[Request], progress: bool = False) -> dict[str, Reply]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return {reply.key: reply for reply in pool.map(self._one, requests)}

    def close(self) -> None:
        pass
