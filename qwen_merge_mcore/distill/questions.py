"""Questions to distill, read from text rows (the layouts `qmm data render` reads: messages,
alpaca, R1-distill, question/answer) and multimodal rows (the training formats, with images).

Every question gets an id: the row's `id` column, else a hash of the row's content, which stays
the same when the file is reread, reordered or split into shards. Images are copied into the
output's `images/` folder under their content hash, so output rows hold them whatever the input
layout (paths, bytes, data URLs)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

IMAGE_DIR = "images"


@dataclass
class Question:
    id: str
    text: str  # the user turn's text, image tags removed
    parts: list[tuple[str, str]]  # the user turn in order: ("text", str) or ("image", path under out/)
    system: Optional[str] = None
    reference: Optional[str] = None  # the dataset's own answer, if any
    score: Optional[float] = None  # R1-distill's `score` of that reference

    @property
    def images(self) -> list[str]:
        return [value for kind, value in self.parts if kind == "image"]


def stable_id(row: dict) -> str:
    """`h<16 hex>` from the row's content (bytes hashed, keys sorted)."""
    def default(value: Any) -> str:
        if isinstance(value, (bytes, bytearray)):
            return hashlib.sha1(value).hexdigest()
        return repr(value)

    return "h" + hashlib.sha1(json.dumps(row, sort_keys=True, default=default).encode()).hexdigest()[:16]


def read_questions(src: str, out: Path, bad: Counter) -> Iterator[Question]:
    """Questions of a file or folder in file and row order. Rows that are neither a text question
    nor a usable multimodal row, and repeated ids, are skipped and counted in `bad` by reason."""
    from ..data.errors import BadSample, log
    from ..data.readers import dataset_files, open_file

    seen: set[str] = set()
    for path in dataset_files(src):
        rows = open_file(path)
        for i in range(len(rows)):
            where = f"{path}:{i}"
            try:
                row = rows[i]
                question = parse_row(row, os.path.dirname(path), out)
            except (BadSample, ValueError, TypeError, KeyError, OSError) as err:
                reason = getattr(err, "reason", "malformed_row")
                bad[reason] += 1
                log.warning("skipping %s: %s", where, err)
                continue
            if question.id in seen:
                bad["duplicate_id"] += 1
                log.warning("skipping %s: id %s repeats an earlier row", where, question.id)
                continue
            seen.add(question.id)
            yield question


def _is_multimodal(row: dict) -> bool:
    if "conversations" in row or "images" in row or "image" in row:
        return True
    return "messages" in row and any(isinstance(m, dict) and not isinstance(m.get("content"), str)
                                     for m in row["messages"])


def parse_row(row: Any, data_root: str, out: Path) -> Question:
    from ..data.tools.render import question_answer

    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    qid = str(row["id"]) if row.get("id") not in (None, "") else stable_id(row)
    score = row.get("score")
    score = float(score) if isinstance(score, (int, float)) else None
    if not _is_multimodal(row):
        question, answer, _ = question_answer(row)
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty or not text")
        return Question(qid, question, [("text", question)], reference=answer if isinstance(answer, str) else None,
                        score=score)
    return _multimodal(row, qid, data_root, out, score)


def _multimodal(row: dict, qid: str, data_root: str, out: Path, score: Optional[float]) -> Question:
    from ..data.formats import to_sample

    sample = to_sample(row, "auto", qid, data_root)
    system = next((m for m in sample.messages if m.role == "system"), None)
    user = next(m for m in sample.messages if m.role == "user")
    answer = next((m for m in sample.messages if m.role == "assistant"), None)
    media = iter(sample.images)
    if sample.videos:
        raise ValueError("videos are not distilled (image and text questions only)")
    parts = []
    for p in user.parts:
        parts.append(("text", p.text) if p.type == "text" else ("image", save_image(next(media), out)))
    text = "".join(v for k, v in parts if k == "text")
    return Question(qid, text, parts, system="".join(p.text or "" for p in system.parts) if system else None,
                    reference="".join(p.text or "" for p in answer.parts) if answer else None, score=score)


def save_image(item, out: Path) -> str:
    """Copy an image (path or bytes) to `out/images/<sha1>.<ext>`; returns that relative path."""
    from PIL import Image, UnidentifiedImageError

    from ..utils.atomic import atomic_write_bytes

    data = item if isinstance(item, bytes) else Path(item).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            ext = (img.format or "png").lower().replace("jpeg", "jpg")
    except UnidentifiedImageError:
        raise ValueError(f"image {item if isinstance(item, str) else '(bytes)'} is not a readable image") from None
    name = f"{IMAGE_DIR}/{hashlib.sha1(data).hexdigest()[:24]}.{ext}"
    if not (out / name).exists():
        (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / name, data)
    return name


def chat_messages(q: Question, out: Path, suffix: str = "") -> list[dict]:
    """The OpenAI chat messages asking `q` (images as data: URLs, accepted offline and by servers)."""
    content: list[dict] = []
    for kind, value in q.parts:
        if kind == "text":
            content.append({"type": "text", "text": value})
        else:
            mime = "jpeg" if value.endswith(".jpg") else value.rsplit(".", 1)[-1]
            data = base64.b64encode((out / value).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": f"data:image/{mime};base64,{data}"}})
    if suffix:
        content.append({"type": "text", "text": suffix})
    if not q.images:  # text only: a plain string, as text chat templates expect
        content = "".join(c["text"] for c in content)
    messages = [{"role": "system", "content": q.system}] if q.system else []
    return messages + [{"role": "user", "content": content}]
