"""One training conversation in a format-neutral form: the readers produce it, the template consumes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

PartType = Literal["text", "image", "video"]
# Media as raw bytes (inside parquet) or a path already resolved against the data folder.
Media = Union[bytes, str]


@dataclass
class Part:
    type: PartType
    text: str = ""


@dataclass
class Message:
    role: Literal["system", "user", "assistant"]
    parts: list[Part]
    reasoning: Optional[str] = None  # an assistant's thinking, when given apart from the answer


@dataclass
class Sample:
    row_id: str  # "<dataset>:<row>[:<id column>]", what logs name
    messages: list[Message]
    images: list[Media] = field(default_factory=list)
    videos: list[Media] = field(default_factory=list)

    def count(self, kind: PartType) -> int:
        return sum(p.type == kind for m in self.messages for p in m.parts)
