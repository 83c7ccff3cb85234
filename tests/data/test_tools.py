"""`qmm data` tools: convert ReCap / OneVision / synthdog layouts, render questions into images."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen_merge_mcore.cli import main
from qwen_merge_mcore.data import build_train_iterator
from qwen_merge_mcore.data.readers import open_rows
from qwen_merge_mcore.data.tools import render
from qwen_merge_mcore.testing.media import make_image, write_rows


def _conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("downloads")
    img = {"bytes": make_image(80, 120, "JPEG"), "path": "000.jpg"}
    # LLaVA-ReCap: HF parquet under data/, plus the LLaVA JSON list with image files.
    write_rows(root / "recap" / "data" / "train-00000-of-00001.parquet",
               [{"id": f"{i:06d}", "image": img, "conversations": _conv("<image>\nWhat do you see?", f"A scene {i}.")}
                for i in range(5)])
    (root / "recap_json" / "images").mkdir(parents=True)
    (root / "recap_json" / "images" / "a.jpg").write_bytes(img["bytes"])
    (root / "recap_json" / "recap.json").write_text(json.dumps(
        [{"id": "x", "image": "images/a.jpg", "conversations": _conv("<image>\nDescribe.", "A photo.")},
         {"id": "gone", "image": "images/missing.jpg", "conversations": _conv("<image>\nDescribe.", "?")}]))
    # LLaVA-OneVision: a subset folder; one text-only row (image null), one broken row.
    write_rows(root / "onevision" / "CLEVR" / "train-0.parquet", [
        {"id": "ov1", "image": img, "conversations": _conv("<image>\nHow many cubes?", "Three."),
         "data_source": "CLEVR"},
        {"id": "ov2", "image": None, "conversations": _conv("What is 2+2?", "4"), "data_source": "CLEVR"},
        {"id": "ov3", "image": img, "conversations": _conv("<image><image>\nTwo?", "No."), "data_source": "CLEVR"}])
    # synthdog: ground_truth is a JSON string.
    write_rows(root / "synthdog" / "data" / "train-0.parquet",
               [{"image": img, "ground_truth": json.dumps({"gt_parse": {"text_sequence": t}})}
                for t in ("hello world", "你好，世界")])
    return root


@pytest.mark.parametrize("style,src,rows,skipped", [
    ("recap", "recap", 5, {}), ("recap", "recap_json", 1, {"missing_file": 1}),
    ("onevision", "onevision", 2, {"image_token_mismatch": 1}), ("synthdog", "synthdog", 2, {})])
def test_convert_styles_into_trainable_parquet(downloads, tmp_path, style, src, rows, skipped, tokenizer,
                                               model_cfg, data_cfg):
    out = tmp_path / "out"
    from qwen_merge_mcore.data.tools.convert import convert

    report = convert(style, downloads / src, out)
    assert report.rows == rows and dict(report.skipped) == skipped
    table = open_rows(str(out))
    assert len(table) == rows
    first = table[0]
    assert first["messages"][0]["role"] == "user" and first["messages"][1]["role"] == "assistant"
    if style == "synthdog":
        assert first["messages"][0]["content"] == "<image>\nRead all the text in the image."
        assert table[1]["messages"][1]["content"] == "你好，世界"
    it = build_train_iterator(data_cfg([{"path": str(out)}], template="pretrain"), model_cfg, tokenizer)
    batch = next(it)
    assert it.bad.bad == 0 and batch.num_loss_tokens > 0
    with pytest.raises(FileExistsError):
        convert(style, downloads / src, out)


QUESTION = ("已知函数 f(x) = x^2 - 4x + 3，求 f(x) 的最小值，并说明取得最小值时 x 的取值。\n"
            + "Then explain, step by step, why the derivative of sin(x)cos(x) is cos(2x). " * 8
            + "\nA word too long for any line: " + "x" * 120)


def test_render_wraps_paginates_and_keeps_every_character():
    from PIL import Image, ImageFont

    style = render.PageStyle(width=320, height=200, font_size=18)
    font = ImageFont.truetype(render.find_font(QUESTION), style.font_size)
    lines = render.wrap(QUESTION, font, style.width - 2 * style.margin)
    assert all(font.getlength(line) <= style.width - 2 * style.margin for line in lines)
    # Nothing dropped: the lines hold every non-space character of the question, in order.
    assert "".join(lines).replace(" ", "") == QUESTION.replace(" ", "").replace("\n", "")
    pages = render.render_pages(QUESTION, style)
    assert len(pages) == -(-len(lines) // style.lines_per_page) > 1
    assert pages == render.render_pages(QUESTION, style)  # deterministic, byte for byte
    import io

    first = Image.open(io.BytesIO(pages[0]))
    assert first.size == (320, 200) and first.convert("L").getextrema()[0] < 64  # ink on the page


def test_render_refuses_cjk_without_a_cjk_font(monkeypatch):
    monkeypatch.setattr(render, "CJK_FONT_GLOBS", [])
    with pytest.raises(render.FontMissing, match="fonts-noto-cjk"):
        render.render_pages("你好")
    assert render.render_pages("plain latin text")  # DejaVu suffices


def test_render_cli_output_trains(tmp_path, tokenizer, model_cfg, data_cfg):
    src = write_rows(tmp_path / "q.jsonl", [
        {"input": QUESTION, "content": "x = 2", "reasoning_content": "f'(x) = 2x - 4 = 0"},
        {"instruction": "What is 2+2?", "input": "", "output": "4"},
        {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]},
        {"unrelated": 1}])
    out = tmp_path / "rendered"
    assert main(["data", "render", "--input", src, "--out", str(out), "--page-size", "448x224"]) == 0
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len(rows[0]["images"]) > 1 and len(rows[1]["images"]) == 1
    assert rows[0]["messages"][0]["content"].startswith("<image><image>")
    assert rows[0]["messages"][1]["content"] == "<think>\nf'(x) = 2x - 4 = 0\n</think>\n\nx = 2"
    assert all((out / name).exists() for r in rows for name in r["images"])
    cfg = data_cfg([{"path": str(out / "data.jsonl")}], template="qwen3", seq_length=2048, max_pixels=448 * 224)
    it = build_train_iterator(cfg, model_cfg, tokenizer)
    batch = next(it)
    assert it.bad.bad == 0 and batch.images.grid_thw[:, 1:].tolist()[0] in ([16, 32], [8, 32], [16, 16])


def test_data_subcommands_show_examples(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert "qmm data convert --style recap" in capsys.readouterr().out


def test_check_command_reports_bad_rows_and_packing(tmp_path, tiny, capsys):
    img = tmp_path / "a.png"
    img.write_bytes(make_image(60, 90, "PNG"))
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                        {"type": "text", "text": f"Question {i}?"}]},
                          {"role": "assistant", "content": "Yes."}]} for i in range(9)]
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    data = write_rows(tmp_path / "mix.jsonl", rows)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ntrain: {{train_iters: 1}}\n"
                   f"data: {{datasets: [{{path: {data}}}], seq_length: 256, max_pixels: 12544, max_bad_fraction: 0.5}}\n")
    assert main(["data", "check", str(cfg), "--tokenizer", str(tiny["qwen3"]), "--samples", "10"]) == 0
    out = capsys.readouterr().out
    assert "samples checked: 10, usable: 9, bad: 1 {'malformed_row': 1}" in out and "packing efficiency" in out


DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # Latin, Greek, Cyrillic: no CJK


def test_render_skips_rows_the_font_cannot_draw_and_says_so(tmp_path, capsys, caplog):
    if not render.has_cjk("你") or not __import__("os").path.isfile(DEJAVU):
        pytest.skip(f"needs {DEJAVU} (Debian fonts-dejavu-core)")
    mixed = write_rows(tmp_path / "mixed.jsonl", [{"question": "你好，世界", "answer": "hi"},
                                                  {"question": "Hello, world", "answer": "hi"}])
    out = tmp_path / "out"
    assert main(["data", "render", "--input", mixed, "--out", str(out), "--font", DEJAVU]) == 0
    said = capsys.readouterr()
    assert "1 questions rendered" in said.out and "1 with characters the font has no glyph for: 你好，世界" in said.out
    assert "skipping row 0: font" in caplog.text and "'你' (U+4F60)" in caplog.text  # per row, the characters
    assert [json.loads(line)["id"] for line in (out / "data.jsonl").read_text().splitlines()] == ["1"]
    # Nothing drawable at all: status 1, one line, no output.
    chinese = write_rows(tmp_path / "zh.jsonl", [{"question": "你好", "answer": "hi"}])
    assert main(["data", "render", "--input", chinese, "--out", str(tmp_path / "none"), "--font", DEJAVU]) == 1
    assert "no row could be rendered" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # The glyph check itself: a CJK font draws these, DejaVu draws Latin but not CJK.
    font = render.load_font(DEJAVU, 20)
    assert font.missing("héllo wörld") == [] and font.missing("a你b好a你") == ["你", "好"]
    with pytest.raises(render.MissingGlyphs, match="U\\+4F60"):
        render.render_pages("你", font_path=DEJAVU)


def test_render_names_a_missing_font_and_a_malformed_row(tmp_path, capsys, caplog):
    rows = write_rows(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}, {"instruction": "no output"},
                                             {"unrelated": 1}, {"messages": [{"content": "no role"}]}])
    missing = tmp_path / "no-such-font.ttf"
    assert main(["data", "render", "--input", rows, "--out", str(tmp_path / "o1"), "--font", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"qmm data render: error: --font {missing}: no such file" in err and "Traceback" not in err
    assert main(["data", "render", "--input", rows, "--out", str(tmp_path / "o2"), "--font", rows]) == 1
    assert "cannot be read as a TrueType/OpenType font" in capsys.readouterr().err
    assert main(["data", "render", "--input", rows, "--out", str(tmp_path / "o3")]) == 0
    said = capsys.readouterr()
    assert "3 rows skipped (3 malformed)" in said.out
    assert "skipping row 1: alpaca row lacks 'output'" in caplog.text
    assert "skipping row 2: unknown row layout (keys: unrelated)" in caplog.text
    assert "skipping row 3: messages row: every message needs 'role' and 'content'" in caplog.text


def test_convert_names_a_corrupt_parquet_file(downloads, tmp_path, capsys):
    src = tmp_path / "recap"
    shutil.copytree(downloads / "recap", src)
    bad = src / "data" / "train-00001-of-00002.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert main(["data", "convert", "--style", "recap", "--input", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"qmm data convert: error: {bad}: not a readable parquet file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_reads_one_split_and_takes_a_glob(downloads, tmp_path, capsys):
    src = tmp_path / "synthdog"
    shutil.copytree(downloads / "synthdog", src)
    write_rows(src / "data" / "validation-00000-of-00001.parquet",
               [{"image": {"bytes": make_image(80, 120, "JPEG"), "path": "v.jpg"},
                 "ground_truth": json.dumps({"gt_parse": {"text_sequence": "validation text"}})}])
    out = tmp_path / "out"
    assert main(["data", "convert", "--style", "synthdog", "--input", str(src), "--out", str(out)]) == 0
    assert "2 rows written from 1 files, 1 of other splits left out" in capsys.readouterr().out
    texts = [r["messages"][1]["content"] for r in open_rows(str(out))]
    assert texts == ["hello world", "你好，世界"]  # no validation row in the training output
    assert main(["data", "convert", "--style", "synthdog", "--input", str(src), "--out", str(out), "--overwrite",
                 "--split", "validation"]) == 0
    assert [r["messages"][1]["content"] for r in open_rows(str(out))] == ["validation text"]
    assert main(["data", "convert", "--style", "synthdog", "--input", str(src / "data" / "*.parquet"), "--out",
                 str(out), "--overwrite", "--split", "all"]) == 0
    assert len(open_rows(str(out))) == 3
    assert main(["data", "convert", "--style", "synthdog", "--input", str(src / "nothing-*.parquet"), "--out",
                 str(tmp_path / "none")]) == 1
    assert "no .parquet, .jsonl or .json files" in capsys.readouterr().err


def _check_config(tmp_path, rows, extra=""):
    data = write_rows(tmp_path / "mix.jsonl", rows)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"model: {{preset: tiny}}\ntrain: {{train_iters: 1}}\n{extra}"
                   f"data: {{datasets: [{{path: {data}}}], seq_length: 256, max_pixels: 12544, max_bad_fraction: 0.5}}\n")
    return cfg


def test_check_decodes_every_image_it_counts_as_usable(tmp_path, tiny, capsys):
    good = make_image(112, 112, "JPEG")
    corrupt = good[:good.index(b"\xff\xda")] + b"\xff\xd9"  # headers intact (sizes read), no image data
    rows = []
    for i in range(60):
        name = f"{i}.jpg"
        (tmp_path / name).write_bytes(corrupt if i % 3 == 0 else good)
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                               {"type": "text", "text": f"Question {i}?"}]},
                                  {"role": "assistant", "content": "Yes."}]})
    cfg = _check_config(tmp_path, rows)
    assert main(["data", "check", str(cfg), "--tokenizer", str(tiny["qwen3"]), "--samples", "60"]) == 0
    out = capsys.readouterr().out
    assert "samples checked: 60, usable: 40, bad: 20 {'bad_image': 20}" in out, out
    # Overrides after the options; a bad fraction above the limit is status 1 (training would stop).
    assert main(["data", "check", str(cfg), "--tokenizer", str(tiny["qwen3"]), "--samples", "60",
                 "data.max_bad_fraction=0.1"]) == 1
    assert "exceeds data.max_bad_fraction=0.1: training would stop" in capsys.readouterr().out


def test_check_finds_the_tokenizer_as_training_does_and_fails_fast_without_one(tmp_path, tiny, capsys, monkeypatch):
    import time

    from qwen_merge_mcore.checkpoint.hf2mcore import HF_META, copy_hf_meta

    converted = tmp_path / "converted"  # the layout `qmm hf2mcore` writes: torch_dist files + hf_meta/
    converted.mkdir()
    (converted / "metadata.json").write_text("{}")
    copy_hf_meta(tiny["qwen3"], converted / HF_META)
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]}] * 4
    cfg = _check_config(tmp_path, rows, f"checkpoint: {{pretrained: {converted}}}\n")
    assert main(["data", "check", str(cfg), "--samples", "4"]) == 0
    assert "samples checked: 4, usable: 4" in capsys.readouterr().out
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # as on a user's machine: no hub lookup either way
    missing = tmp_path / "no-such-tokenizer"
    start = time.monotonic()
    assert main(["data", "check", str(cfg), "--samples", "4", "--tokenizer", str(missing)]) == 1
    assert time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert f"tokenizer {missing}: no such folder" in err and "Traceback" not in err
