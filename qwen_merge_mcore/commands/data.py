NAME = "data"
HELP = "Prepare training data: convert public layouts, render text questions to images, check a mix."
EXAMPLES = [
    "qmm data convert --style recap --input downloads/LLaVA-ReCap-558K --out data/llava-recap-558k",
    "qmm data convert --style synthdog --input downloads/synthdog-zh --out data/synthdog-zh --prompt '识别图中文字'",
    "qmm data convert --style synthdog --input 'downloads/synthdog-en/data/train-*.parquet' --out data/synthdog-en",
    "qmm data render --input r1_questions.jsonl --out data/stage3-rendered-questions --font /usr/share/fonts/my.ttc",
    "qmm data check launch/stage3.yaml --samples 2000 data.seq_length=4096",
]


def _example(prefix: str) -> dict:
    import argparse

    lines = [e for e in EXAMPLES if e.startswith(prefix)]
    return {"epilog": "example:\n" + "\n".join(f"  {e}" for e in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="<tool>", required=True)
    c = sub.add_parser("convert", help="LLaVA-ReCap / LLaVA-OneVision / synthdog files -> training parquet",
                       description="Convert a local folder (or file) of a public dataset into LLaMA-Factory "
                       "style parquet shards (messages + images as bytes) that data.datasets reads.",
                       **_example("qmm data convert"))
    c.add_argument("--style", required=True, choices=["recap", "onevision", "synthdog"])
    c.add_argument("--input", required=True, help="downloaded dataset folder, one file, or a glob (quoted)")
    c.add_argument("--split", default="train",
                   help="from a folder or glob, read only this split's files: train (default), validation, test "
                        "or all; files whose name or folder names no split are always read")
    c.add_argument("--out", required=True, help="output folder (data-00000.parquet, ...)")
    c.add_argument("--prompt", default="Read all the text in the image.", help="synthdog: the user prompt")
    c.add_argument("--limit", type=int, help="stop after this many rows")
    c.add_argument("--rows-per-shard", type=int, default=10_000)
    c.add_argument("--overwrite", action="store_true")

    r = sub.add_parser("render", help="render text questions into images (stage 3)",
                       description="Draw each question (wrapped, paginated, CJK-capable) into PNG pages; "
                       "write out/data.jsonl rows whose user turn is the pages plus an instruction.",
                       **_example("qmm data render"))
    r.add_argument("--input", required=True, help="JSONL/parquet: messages, alpaca, R1-distill or question/answer")
    r.add_argument("--out", required=True, help="output folder (data.jsonl, images/)")
    r.add_argument("--instruction", default="Answer the question in the image.")
    r.add_argument("--font", help="TrueType/OpenType font file (default: a CJK font found on the system)")
    r.add_argument("--font-size", type=int, default=20)
    r.add_argument("--page-size", default="504x504", help="WIDTHxHEIGHT in pixels")
    r.add_argument("--limit", type=int)
    r.add_argument("--overwrite", action="store_true")

    k = sub.add_parser("check", help="run a config's data mix through the pipeline and report",
                       description="Read, tokenise, pack and decode samples of data.datasets like training "
                       "does; print bad samples per reason and the packing efficiency. Exit status 1 when the bad "
                       "fraction exceeds data.max_bad_fraction (training would stop).",
                       **_example("qmm data check"))
    k.add_argument("config", help="YAML experiment config")
    k.add_argument("overrides", nargs="*", help="dotted overrides, key.path=value")
    k.add_argument("--tokenizer", help="tokenizer folder (default: as training finds it: data.tokenizer, else the "
                                       "hf_meta/ of checkpoint.save's or checkpoint.pretrained's checkpoint)")
    k.add_argument("--samples", type=int, default=1000, help="samples to check")


def run(args) -> int:
    return {"convert": _convert, "render": _render, "check": _check}[args.data_command](args)


def _convert(args) -> int:
    from ..data.tools.convert import convert

    print(convert(args.style, args.input, args.out, prompt=args.prompt, overwrite=args.overwrite,
                  limit=args.limit, rows_per_shard=args.rows_per_shard, split=args.split))
    return 0


def _render(args) -> int:
    from ..data.tools.render import PageStyle, render_dataset

    try:
        width, height = (int(x) for x in args.page_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--page-size {args.page_size!r} is not WIDTHxHEIGHT") from None
    report = render_dataset(args.input, args.out, args.instruction,
                            PageStyle(width=width, height=height, font_size=args.font_size), args.font,
                            overwrite=args.overwrite, limit=args.limit)
    print(f"{report}; pages under {args.out}/images, rows in {args.out}/data.jsonl")
    return 0


def _check(args) -> int:
    from ..config import load_config
    from ..data.check import check_mix
    from ..training.data_source import tokenizer_dir

    cfg = load_config(args.config, args.overrides, check_runtime=False)
    report, ok = check_mix(cfg.data, cfg.model, args.tokenizer or tokenizer_dir(cfg), args.samples, cfg.train.seed)
    print(report)
    return 0 if ok else 1
