"""Row layouts users have, normalised to `Sample`.

- `messages` (OpenAI style): `messages: [{role, content}]`, content a string or a list of parts
  `{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url"}}`, `{"type": "image", "image"}`,
  `{"type": "video", "video"}` / `{"type": "video_url", "video_url": {"url"}}`; assistant messages may
  carry `reasoning_content`.
- `sharegpt` (LLaVA): `conversations: [{from: human|gpt|system, value}]` with `<image>`/`<video>` tags,
  plus `image` / `video` (one item or a list).
- `llamafactory`: `messages: [{role, content}]` with `<image>`/`<video>` tags, plus `images` / `videos`.

Media items are paths (relative to the data folder), `data:` URLs, raw bytes, or the
`{"bytes", "path"}` structs that Hugging Face datasets write into parquet. When a row has media
but no tags at all, the media go in front of the first user message (LLaVA's convention); when it
has tags, their number must match the media, or the row is an `image_token_mismatch`.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any, Callable, Optional

from .errors import BadSample
from .sample import Media, Message, Part, Sample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "bot": "assistant", "model": "assistant"}
_TAG = re.compile(r"(<image>|<video>)")


def detect_format(row: dict) -> str:
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        if "images" in row or "videos" in row:
            return "llamafactory"
        return "messages"
    raise BadSample("malformed_row", f"neither 'messages' nor 'conversations' in columns {sorted(row)}")


def row_label(row: Any, row_id: str) -> str:
    """`<dataset>:<index>`, plus the row's own `id` column when it has one."""
    if isinstance(row, dict) and row.get("id") is not None:
        return f"{row_id}:{row['id']}"
    return row_id


def to_sample(row: Any, fmt: str, row_id: str, data_root: str) -> Sample:
    """Raises BadSample('malformed_row' or 'image_token_mismatch') for rows it cannot use."""
    if not isinstance(row, dict):
        raise BadSample("malformed_row", f"row is a {type(row).__name__}, not an object")
    if fmt == "auto":
        fmt = detect_format(row)
    row_id = row_label(row, row_id)
    try:
        sample = _PARSERS[fmt](row, row_id, data_root)
    except (KeyError, TypeError, AttributeError) as err:
        raise BadSample("malformed_row", f"{fmt} row: {type(err).__name__}: {err}") from None
    _check_turns(sample)
    return sample


def _media(item: Any, data_root: str, kind: str) -> Media:
    if isinstance(item, dict):
        if item.get("bytes"):
            return bytes(item["bytes"])
        item = item.get("path") or item.get("url") or item.get(kind) or item.get(f"{kind}_url")
        if isinstance(item, dict):
            item = item.get("url")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if not isinstance(item, str) or not item:
        raise BadSample("malformed_row", f"{kind} reference {item!r} is neither a path nor bytes")
    if item.startswith("data:"):
        try:
            return base64.b64decode(item.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise BadSample("malformed_row", f"bad data URL for an {kind}") from None
    if item.startswith("file://"):
        item = item[len("file://"):]
    return item if os.path.isabs(item) else os.path.join(data_root, item)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _tagged_parts(text: str) -> list[Part]:
    parts = []
    for piece in _TAG.split(text):
        if piece == "<image>":
            parts.append(Part("image"))
        elif piece == "<video>":
            parts.append(Part("video"))
        elif piece:
            parts.append(Part("text", piece))
    return parts


def _attach_untagged(messages: list[Message], images: list, videos: list) -> None:
    """Media without any tag go in front of the first user message."""
    tags = sum(p.type in ("image", "video") for m in messages for p in m.parts)
    if tags or not (images or videos):
        return
    for m in messages:
        if m.role == "user":
            m.parts[:0] = [Part("image") for _ in images] + [Part("video") for _ in videos]
            return


def _split_think(text: str) -> tuple[Optional[str], str]:
    """`<think>r</think>answer` -> (r, answer); no think block -> (None, text)."""
    if "</think>" not in text:
        return None, text
    head, answer = text.split("</think>", 1)
    return head.split("<think>")[-1].strip("\n"), answer.lstrip("\n")


def _message(role: str, parts: list[Part], reasoning: Optional[str] = None) -> Message:
    if role not in ROLES:
        raise BadSample("malformed_row", f"unknown role {role!r}")
    role = ROLES[role]
    if role == "assistant" and reasoning is None and len(parts) == 1 and parts[0].type == "text":
        reasoning, answer = _split_think(parts[0].text)
        parts = [Part("text", answer)]
    return Message(role, parts, reasoning)


def _parse_sharegpt(row: dict, row_id: str, data_root: str) -> Sample:
    messages = [_message(turn["from"], _tagged_parts(_text(turn["value"]))) for turn in row["conversations"]]
    images = [_media(x, data_root, "image") for x in _as_list(row.get("image", row.get("images")))]
    videos = [_media(x, data_root, "video") for x in _as_list(row.get("video", row.get("videos")))]
    _attach_untagged(messages, images, videos)
    return Sample(row_id, messages, images, videos)


def _parse_llamafactory(row: dict, row_id: str, data_root: str) -> Sample:
    messages = [_message(m["role"], _tagged_parts(_text(m["content"])), m.get("reasoning_content"))
                for m in row["messages"]]
    images = [_media(x, data_root, "image") for x in _as_list(row.get("images"))]
    videos = [_media(x, data_root, "video") for x in _as_list(row.get("videos"))]
    _attach_untagged(messages, images, videos)
    return Sample(row_id, messages, images, videos)


def _parse_messages(row: dict, row_id: str, data_root: str) -> Sample:
    messages, images, videos = [], [], []
    for m in row["messages"]:
        content = m["content"]
        if isinstance(content, str):
            parts = [Part("text", content)]
        else:
            parts = []
            for part in content:
                kind = part.get("type") or next(k for k in ("text", "image", "image_url", "video") if k in part)
                if kind == "text":
                    parts.append(Part("text", _text(part["text"])))
                elif kind in ("image", "image_url"):
                    images.append(_media(part.get(kind, part), data_root, "image"))
                    parts.append(Part("image"))
                elif kind in ("video", "video_url"):
                    videos.append(_media(part.get(kind, part), data_root, "video"))
                    parts.append(Part("video"))
                else:
                    raise BadSample("malformed_row", f"unknown content part type {kind!r}")
        messages.append(_message(m["role"], parts, m.get("reasoning_content")))
    return Sample(row_id, messages, images, videos)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadSample("malformed_row", f"text is a {type(value).__name__}, not a string")
    return value


def _check_turns(sample: Sample) -> None:
    roles = [m.role for m in sample.messages]
    if "assistant" not in roles or "user" not in roles:
        raise BadSample("malformed_row", f"needs a user and an assistant turn, has roles {roles}")
    for kind, media in (("image", sample.images), ("video", sample.videos)):
        if sample.count(kind) != len(media):
            raise BadSample("image_token_mismatch",
                            f"{sample.count(kind)} {kind} placeholders but {len(media)} {kind}s")


_PARSERS: dict[str, Callable[[dict, str, str], Sample]] = {
    "messages": _parse_messages, "sharegpt": _parse_sharegpt, "llamafactory": _parse_llamafactory,
}
