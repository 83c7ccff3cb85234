"""The recipe's sampling: a thinking reply for every question (Qwen3's recommended temperature
0.6, top_p 0.95, top_k 20) and, for a fraction of the questions chosen by id, a second reply
with thinking turned off through the chat template (temperature 0.7, top_p 0.8, top_k 20).
Seeds and the choice derive from the question id, so reruns, shards and servers agree."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mode:
    name: str
    thinking: bool
    temperature: float
    top_p: float
    top_k: int = 20


THINK = Mode("think", True, 0.6, 0.95)
NO_THINK = Mode("nothink", False, 0.7, 0.8)
MODES = {m.name: m for m in (THINK, NO_THINK)}


@dataclass
class SamplingConfig:
    max_tokens: int = 16384  # Qwen3-32B thinking traces on competition maths run past 8K
    nothink_fraction: float = 0.5
    stop: list[str] = field(default_factory=list)  # extra stop strings (EOS always stops)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens

    def validate(self) -> None:
        if not 0.0 <= self.nothink_fraction <= 1.0:
            raise ValueError(f"--nothink-fraction {self.nothink_fraction}: must be within [0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens {self.max_tokens}: must be positive")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def seed_for(qid: str, mode: Mode) -> int:
    return _hash(f"{qid}|{mode.name}") & 0x7FFFFFFF


def modes_for(qid: str, cfg: SamplingConfig) -> list[Mode]:
    """THINK always; NO_THINK for `nothink_fraction` of the ids (a deterministic coin per id)."""
    return [THINK] + ([NO_THINK] if _hash(f"{qid}|nothink-coin") / 2**64 < cfg.nothink_fraction else [])


def params(qid: str, mode: Mode, cfg: SamplingConfig) -> dict:
    """SamplingParams fields; every field the server would otherwise default is set (min_p,
    penalties), so offline and server runs sample the same distribution."""
    return {"temperature": mode.temperature, "top_p": mode.top_p, "top_k": mode.top_k, "min_p": 0.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
            "seed": seed_for(qid, mode), "max_tokens": cfg.max_tokens, "stop": list(cfg.stop),
            "stop_token_ids": list(cfg.stop_token_ids)}
