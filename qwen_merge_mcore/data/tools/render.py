"""Render stage-3 text questions into images (the question itself, wrapped and paginated).

The original pipeline drew a placeholder sentence instead of the question; here every character
of the question is drawn: lines are wrapped by measured pixel width (words for Latin text, single
characters for CJK, over-long words broken), and text that does not fit one page continues on
the next, so a long question becomes several images. Rendering is deterministic (same text,
font and sizes -> identical PNG bytes).

Fonts: `--font`, else the first CJK-capable font found (Noto Sans CJK from Debian's
fonts-noto-cjk, WenQuanYi, Droid Sans Fallback); text without CJK falls back to DejaVu Sans.
Text with CJK and no such font is refused with an error saying what to install.
"""

from __future__ import annotations

import glob
import io
import unicodedata
from dataclasses import dataclass
from typing import Optional

CJK_FONT_GLOBS = [
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK*.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/**/NotoSansCJK*.ttc",
]
LATIN_FONT_GLOBS = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/**/DejaVuSans.ttf"]
INSTALL_HINT = ("no CJK font found: install one (Debian/Ubuntu: `apt-get install fonts-noto-cjk`; "
                "scripts/install-cpu.sh does this when it runs as root) or pass --font PATH")


class FontMissing(ValueError):
    pass


@dataclass(frozen=True)
class PageStyle:
    width: int = 504  # 504 x 504 = 254016 pixels: within the stages' max_pixels 262144, no downscale
    height: int = 504
    margin: int = 16
    font_size: int = 20
    line_spacing: float = 1.35
    background: tuple[int, int, int] = (255, 255, 255)
    color: tuple[int, int, int] = (0, 0, 0)

    @property
    def line_height(self) -> int:
        return int(round(self.font_size * self.line_spacing))

    @property
    def lines_per_page(self) -> int:
        return max(1, (self.height - 2 * self.margin) // self.line_height)


def has_cjk(text: str) -> bool:
    return any(_is_wide(c) for c in text)


def _is_wide(c: str) -> bool:
    return unicodedata.east_asian_width(c) in ("W", "F")


def find_font(text: str, font: Optional[str] = None) -> str:
    if font:
        return font
    for pattern in CJK_FONT_GLOBS + ([] if has_cjk(text) else LATIN_FONT_GLOBS):
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    raise FontMissing(INSTALL_HINT if has_cjk(text) else "no TrueType font found; pass --font PATH")


def _tokens(paragraph: str) -> list[str]:
    """Words (with the space after them kept separate) for Latin text, single characters for CJK."""
    out, word = [], ""
    for ch in paragraph:
        if ch.isspace() or _is_wide(ch):
            if word:
                out.append(word)
                word = ""
            out.append(ch)
        else:
            word += ch
    if word:
        out.append(word)
    return out


def wrap(text: str, font, max_width: int) -> list[str]:
    """Lines no wider than max_width pixels; joining them (with the newlines and the spaces at
    line breaks) gives back the text."""
    lines: list[str] = []
    for paragraph in text.replace("\r\n", "\n").split("\n"):
        line = ""
        for tok in _tokens(paragraph):
            if font.getlength(line + tok) <= max_width:
                line += tok
                continue
            if tok.isspace():  # a break point: the space is not drawn at the line end
                lines.append(line)
                line = ""
                continue
            if line.strip():
                lines.append(line)
                line = ""
            while font.getlength(tok) > max_width:  # a word wider than the page: break it
                cut = 1
                while cut < len(tok) and font.getlength(tok[:cut + 1]) <= max_width:
                    cut += 1
                lines.append(tok[:cut])
                tok = tok[cut:]
            line = tok
        lines.append(line)
    return lines


def render_pages(text: str, style: PageStyle = PageStyle(), font_path: Optional[str] = None) -> list[bytes]:
    """PNG pages of the question. The last page is cropped to its text."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(find_font(text, font_path), style.font_size)
    lines = wrap(text, font, style.width - 2 * style.margin)
    pages = []
    per = style.lines_per_page
    for start in range(0, len(lines), per):
        chunk = lines[start:start + per]
        height = style.height if start + per < len(lines) else min(
            style.height, 2 * style.margin + len(chunk) * style.line_height)
        img = Image.new("RGB", (style.width, height), style.background)
        draw = ImageDraw.Draw(img)
        for i, line in enumerate(chunk):
            draw.text((style.margin, style.margin + i * style.line_height), line, font=font, fill=style.color)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        pages.append(buf.getvalue())
    return pages


DEFAULT_INSTRUCTION = "Answer the question in the image."


def question_answer(row: dict) -> tuple[str, str, Optional[str]]:
    """(question, answer, reasoning) from a `messages` row, alpaca (`instruction`, `input`,
    `output`), R1-distill (`input`, `content`, `reasoning_content`) or `question`/`answer`."""
    if "messages" in row:
        user = [m["content"] for m in row["messages"] if m["role"] == "user"]
        bot = [m for m in row["messages"] if m["role"] == "assistant"]
        if len(user) != 1 or len(bot) != 1 or not isinstance(user[0], str):
            raise ValueError("needs one text user turn and one assistant turn")
        return user[0], bot[0]["content"], bot[0].get("reasoning_content")
    if "instruction" in row:
        q = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        return q, row["output"], None
    if "content" in row and "input" in row:
        return row["input"], row["content"], row.get("reasoning_content")
    return row["question"], row["answer"], row.get("reasoning") or row.get("reasoning_content")


@dataclass
class RenderReport:
    rows: int
    pages: int
    skipped: int


def render_dataset(src: str, out: str, instruction: str = DEFAULT_INSTRUCTION, style: PageStyle = PageStyle(),
                   font: Optional[str] = None, overwrite: bool = False, limit: Optional[int] = None) -> RenderReport:
    """`out/data.jsonl` (LLaMA-Factory rows) and `out/images/<row>_<page>.png`."""
    import json

    from tqdm import tqdm

    from ...utils.atomic import atomic_output_dir
    from ..errors import BadSample, log
    from ..readers import open_rows

    rows = open_rows(src)
    n = len(rows) if limit is None else min(limit, len(rows))
    pages_total = skipped = written = 0
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for i in tqdm(range(n), desc="render", unit="question"):
                try:
                    question, answer, reasoning = question_answer(rows[i])
                except (BadSample, KeyError, TypeError, ValueError) as err:
                    skipped += 1
                    log.warning("skipping row %d: %s", i, err)
                    continue
                names = []
                for k, png in enumerate(render_pages(question, style, font)):
                    names.append(f"images/{i:08d}_{k:02d}.png")
                    (tmp / names[-1]).write_bytes(png)
                if reasoning is not None:
                    answer = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.lstrip()}"
                f.write(json.dumps({"id": str(i), "messages": [
                    {"role": "user", "content": "<image>" * len(names) + instruction},
                    {"role": "assistant", "content": answer}], "images": names}, ensure_ascii=False) + "\n")
                pages_total += len(names)
                written += 1
    return RenderReport(written, pages_total, skipped)
