"""Render stage-3 text questions into images (the question itself, wrapped and paginated).

The original pipeline drew a placeholder sentence instead of the question; here every character
of the question is drawn: lines are wrapped by measured pixel width (words for Latin text, single
characters for CJK, over-long words broken), and text that does not fit one page continues on
the next, so a long question becomes several images. Rendering is deterministic (same text,
font and sizes -> identical PNG bytes).

Fonts: `--font`, else the first CJK-capable font found (Noto Sans CJK from Debian's
fonts-noto-cjk, WenQuanYi, Droid Sans Fallback); text without CJK falls back to DejaVu Sans.
Text with CJK and no such font is refused with an error saying what to install. A question with
a character the font has no glyph for (FreeType would draw its .notdef box) is refused too
(`MissingGlyphs`); `render_dataset` skips such rows and counts them.
"""

from __future__ import annotations

import functools
import glob
import io
import os
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


class MissingGlyphs(FontMissing):
    """The font has no glyph for some characters of the text."""

    def __init__(self, font_path: str, chars: list[str]):
        self.font_path, self.chars = font_path, chars
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars[:5]) + (" ..." if len(chars) > 5 else "")
        super().__init__(f"font {font_path} has no glyph for {shown}; pass --font with a font that covers them")


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
        if not os.path.isfile(font):
            raise FontMissing(f"--font {font}: no such file")
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


# Drawn like no glyph: zero-width and layout characters.
_INVISIBLE = ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me")
# A code point no font maps (the last one of plane 16, private use): what .notdef looks like.
_NOTDEF_PROBE = "\U0010FFFD"


class Font:
    """A loaded font and which characters it has glyphs for.

    Pillow exposes no glyph lookup; a character without a glyph is drawn as the font's .notdef
    glyph, so it is recognised by drawing exactly like the probe character above.
    """

    def __init__(self, path: str, size: int):
        from PIL import ImageFont

        try:
            self.face = ImageFont.truetype(path, size)
        except OSError as err:
            raise FontMissing(f"{path}: cannot be read as a TrueType/OpenType font ({err})") from None
        self.path = path
        self._notdef = self._drawn(_NOTDEF_PROBE)
        self._has: dict[str, bool] = {}

    def _drawn(self, ch: str) -> tuple:
        mask = self.face.getmask(ch)
        return mask.size, bytes(mask), self.face.getlength(ch)

    def missing(self, text: str) -> list[str]:
        """The distinct characters of `text` without a glyph, in order of appearance."""
        out = []
        for ch in dict.fromkeys(text):
            if unicodedata.category(ch) in _INVISIBLE:
                continue
            if ch not in self._has:
                self._has[ch] = self._drawn(ch) != self._notdef
            if not self._has[ch]:
                out.append(ch)
        return out


@functools.lru_cache(maxsize=8)
def load_font(path: str, size: int) -> Font:
    return Font(path, size)


def render_pages(text: str, style: PageStyle = PageStyle(), font_path: Optional[str] = None) -> list[bytes]:
    """PNG pages of the question. The last page is cropped to its text. Raises MissingGlyphs
    when the font cannot draw a character of it."""
    from PIL import Image, ImageDraw

    loaded = load_font(find_font(text, font_path), style.font_size)
    missing = loaded.missing(text)
    if missing:
        raise MissingGlyphs(loaded.path, missing)
    font = loaded.face
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


# Row layouts, recognised by their first key, with the keys each needs.
LAYOUTS = (("messages", "messages", ("messages",)), ("instruction", "alpaca", ("instruction", "output")),
           ("content", "R1-distill", ("input", "content")), ("question", "question/answer", ("question", "answer")))


def question_answer(row: dict) -> tuple[str, str, Optional[str]]:
    """(question, answer, reasoning) from a `messages` row, alpaca (`instruction`, `input`,
    `output`), R1-distill (`input`, `content`, `reasoning_content`) or `question`/`answer`.
    A row of none of these, or lacking a key its layout needs, raises ValueError saying which."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    layout = next((lay for lay in LAYOUTS if lay[0] in row), None)
    if layout is None:
        raise ValueError(f"unknown row layout (keys: {', '.join(sorted(map(str, row))[:8]) or 'none'}); expected "
                         "messages, alpaca (instruction/output), R1-distill (input/content) or question/answer")
    lacking = [k for k in layout[2] if k not in row]
    if lacking:
        raise ValueError(f"{layout[1]} row lacks {', '.join(repr(k) for k in lacking)}")
    if layout[1] == "messages":
        try:
            user = [m["content"] for m in row["messages"] if m["role"] == "user"]
            bot = [m for m in row["messages"] if m["role"] == "assistant"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"messages row: every message needs 'role' and 'content' ({err!r})") from None
        if len(user) != 1 or len(bot) != 1 or not isinstance(user[0], str) or "content" not in bot[0]:
            raise ValueError("messages row needs one text user turn and one assistant turn")
        return user[0], bot[0]["content"], bot[0].get("reasoning_content")
    if layout[1] == "alpaca":
        q = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
        return q, row["output"], None
    if layout[1] == "R1-distill":
        return row["input"], row["content"], row.get("reasoning_content")
    return row["question"], row["answer"], row.get("reasoning") or row.get("reasoning_content")


@dataclass
class RenderReport:
    rows: int
    pages: int
    skipped: int  # rows that are not a question and an answer
    missing_glyphs: int = 0  # rows with characters the font cannot draw
    missing_chars: str = ""  # those characters (the first few dozen)

    def __str__(self) -> str:
        why = [f"{self.skipped} malformed"] if self.skipped else []
        if self.missing_glyphs:
            why.append(f"{self.missing_glyphs} with characters the font has no glyph for: {self.missing_chars}")
        return (f"{self.rows} questions rendered into {self.pages} pages; "
                f"{self.skipped + self.missing_glyphs} rows skipped{' (' + '; '.join(why) + ')' if why else ''}")


def render_dataset(src: str, out: str, instruction: str = DEFAULT_INSTRUCTION, style: PageStyle = PageStyle(),
                   font: Optional[str] = None, overwrite: bool = False, limit: Optional[int] = None) -> RenderReport:
    """`out/data.jsonl` (LLaMA-Factory rows) and `out/images/<row>_<page>.png`.

    Malformed rows and rows with characters the font has no glyph for are skipped and counted;
    when no row at all can be rendered, nothing is written and ValueError says why."""
    import json

    from tqdm import tqdm

    from ...utils.atomic import atomic_output_dir, check_output_not_input
    from ..errors import BadSample, log
    from ..readers import open_rows

    check_output_not_input(out, [src], "--out")
    if font is not None:
        load_font(find_font("", font), style.font_size)  # a missing or unreadable --font fails at once
    rows = open_rows(src)
    n = len(rows) if limit is None else min(limit, len(rows))
    report = RenderReport(0, 0, 0)
    lacking: dict[str, None] = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for i in tqdm(range(n), desc="render", unit="question"):
                try:
                    question, answer, reasoning = question_answer(rows[i])
                    if not isinstance(question, str) or not isinstance(answer, str):
                        raise ValueError("the question and the answer must be text")
                    pages = render_pages(question, style, font)
                except MissingGlyphs as err:
                    report.missing_glyphs += 1
                    lacking.update(dict.fromkeys(err.chars))
                    log.warning("skipping row %d: %s", i, err)
                    continue
                except (BadSample, TypeError, ValueError) as err:
                    report.skipped += 1
                    log.warning("skipping row %d: %s", i, err)
                    continue
                names = []
                for k, png in enumerate(pages):
                    names.append(f"images/{i:08d}_{k:02d}.png")
                    (tmp / names[-1]).write_bytes(png)
                if reasoning is not None:
                    answer = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.lstrip()}"
                f.write(json.dumps({"id": str(i), "messages": [
                    {"role": "user", "content": "<image>" * len(names) + instruction},
                    {"role": "assistant", "content": answer}], "images": names}, ensure_ascii=False) + "\n")
                report.pages += len(names)
                report.rows += 1
        report.missing_chars = "".join(list(lacking)[:40]) + (" ..." if len(lacking) > 40 else "")
        if n and not report.rows:
            raise ValueError(f"{src}: no row could be rendered, nothing written ({report})")
    return report
