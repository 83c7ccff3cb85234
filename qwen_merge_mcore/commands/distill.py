NAME = "distill"
HELP = "Stage-3 distillation data: teacher replies with vLLM, judging, the stage-3 mix."
EXAMPLES = [
    "qmm distill generate --teacher models/Qwen3-32B --input downloads/r1-110k.jsonl --out data/distill/r1-qwen3-32b",
    "qmm distill generate --teacher models/Qwen2.5-VL-72B --input data/onevision-sample --out data/distill/mm "
    "--shard 0/8 --tensor-parallel-size 4",
    "qmm distill generate --server http://node12:8000 --input questions.jsonl --out data/distill/r1 --concurrency 64",
    "qmm distill judge --input data/distill/r1-qwen3-32b --out data/distill/r1-judged --judge models/Qwen3-8B "
    "--keep pass",
    "qmm distill assemble --input data/distill/r1-judged --input data/distill/mm-judged --out data",
]


def _example(prefix: str) -> dict:
    import argparse

    lines = [e for e in EXAMPLES if e.startswith(prefix)]
    return {"epilog": "example:\n" + "\n".join(f"  {e}" for e in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _engine_arguments(p, model_flag: str, model_help: str) -> None:
    """Where replies come from: an offline vLLM engine on MODEL_DIR, or --server URL."""
    src = p.add_mutually_exclusive_group(required=model_flag == "--teacher")
    src.add_argument(model_flag, dest="model", help=model_help)
    src.add_argument("--server", help="OpenAI-compatible endpoint (`vllm serve` elsewhere), e.g. http://host:8000")
    p.add_argument("--vllm-python", help="python that runs vLLM (default: $QMM_VLLM_PYTHON, this python when vllm "
                                         "imports here, else this checkout's .venv-vllm)")
    p.add_argument("--tensor-parallel-size", type=int, help="offline engine TP (default: $QMM_DISTILL_TP, else 1)")
    p.add_argument("--dtype", default="auto", help="offline engine dtype (auto, bfloat16, float32)")
    p.add_argument("--max-model-len", type=int, help="offline engine context length (default: the model's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256, help="offline engine: sequences decoded together")
    p.add_argument("--enforce-eager", action="store_true", help="offline engine: no CUDA graphs / compilation")
    p.add_argument("--concurrency", type=int, default=32, help="--server: requests in flight")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="--server: seconds per request (long traces take many minutes; default 3600)")
    p.add_argument("--retries", type=int, default=4, help="--server: tries per request beyond the first")
    p.add_argument("--chunk", type=int, default=512, help="questions per committed chunk (the unit of resumption)")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="<step>", required=True)
    g = sub.add_parser("generate", help="teacher replies (thinking, and no-thinking for a fraction)",
                       description="Ask the teacher every question of the input (text rows: messages, alpaca, "
                       "R1-distill, question/answer; multimodal rows in the training formats). Output: resumable "
                       "jsonl shards in the training format; rerun the same command after a crash to finish.",
                       **_example("qmm distill generate"))
    _engine_arguments(g, "--teacher", "teacher model folder (offline vLLM)")
    g.add_argument("--input", required=True, help="JSONL/JSON/parquet file or folder of them")
    g.add_argument("--out", required=True, help="output folder (data-*.jsonl, images/, progress/)")
    g.add_argument("--shard", default="0/1", help="i/n: this array task's share of the questions")
    g.add_argument("--nothink-fraction", type=float, default=0.5,
                   help="fraction of questions (chosen by id) that also get a reply with thinking off")
    g.add_argument("--max-tokens", type=int, default=16384)
    g.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    g.add_argument("--stop-token-ids", default="", help="extra stop token ids, comma-separated")
    g.add_argument("--teacher-name", help="name recorded in the rows (default: the model folder's name)")


    j = sub.add_parser("judge", help="a verdict per row: rules, else a judge model with thinking off",
                       description="Grade each generated row against its reference: boxed/final numbers, "
                       "multiple-choice letters and short answers by rule, the rest by a judge model. Writes the "
                       "rows with verdict and reason; with --keep pass only the passing ones (others in rejected/).",
                       **_example("qmm distill judge"))
    _engine_arguments(j, "--judge", "judge model folder (offline vLLM); needed when a row has no rule")
    j.add_argument("--input", required=True, help="output folder of `qmm distill generate`")
    j.add_argument("--out", required=True, help="output folder")
    j.add_argument("--keep", choices=["pass", "fail", "unverified"], help="write only the rows with this verdict")
    j.add_argument("--min-score", type=float, default=8.0,
                   help="R1-distill `score` below which a reference is not trusted (verdict unverified)")
    j.add_argument("--max-tokens", type=int, default=256)
    j.add_argument("--overwrite", action="store_true")


    a = sub.add_parser("assemble", help="the stage-3 mix: rendered text questions + answers, multimodal traces",
                       description="Render the text questions of the given outputs into images (joined with their "
                       "teacher answers), copy the multimodal rows with their images, and write the data section "
                       "for launch/stage3.yaml. Rows with a judge verdict other than pass are left out.",
                       **_example("qmm distill assemble"))
    a.add_argument("--input", required=True, action="append", help="output of generate or judge (repeatable)")
    a.add_argument("--out", required=True, help="folder for stage3-rendered-questions/, stage3-multimodal-reasoning/ "
                                                "and stage3-data.yaml (`data` matches launch/stage3.yaml)")
    a.add_argument("--instruction", default="Answer the question in the image.")
    a.add_argument("--font", help="TrueType/OpenType font file (default: a CJK font found on the system)")
    a.add_argument("--font-size", type=int, default=20)
    a.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    return {"generate": _generate, "judge": _judge, "assemble": _assemble}[args.data_command](args)


def make_backend(args, questions=()) -> "object":
    """The offline engine on args.model, or the server at args.server."""
    import os

    from ..distill.backends import OfflineBackend, vllm_python

    if args.server:
        from ..distill.server import ServerBackend

        return ServerBackend(args.server, concurrency=args.concurrency, timeout=args.timeout, retries=args.retries)
    max_images = max((len(q.images) for q in questions), default=0)
    engine = {"model": args.model, "dtype": args.dtype, "gpu_memory_utilization": args.gpu_memory_utilization,
              "max_num_seqs": args.max_num_seqs, "enforce_eager": args.enforce_eager, "seed": 0,
              "tensor_parallel_size": args.tensor_parallel_size or int(os.environ.get("QMM_DISTILL_TP", "1"))}
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    if max_images:
        engine["limit_mm_per_prompt"] = {"image": max_images}
    return OfflineBackend(engine, vllm_python(args.vllm_python))


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--stop-token-ids {text!r}: expected comma-separated integers") from None


def _generate(args) -> int:
    import os

    from ..distill.generate import generate, parse_shard
    from ..distill.sampling import SamplingConfig

    if not args.server and not os.path.isdir(args.model):
        raise ValueError(f"--teacher {args.model}: not a model folder")
    sampling = SamplingConfig(max_tokens=args.max_tokens, nothink_fraction=args.nothink_fraction, stop=args.stop,
                              stop_token_ids=_ids(args.stop_token_ids))
    report = generate(args.input, args.out, lambda qs: make_backend(args, qs), sampling, parse_shard(args.shard),
                      chunk=args.chunk, teacher=args.teacher_name)
    print(f"qmm distill generate: {report}; rows in {args.out}")
    return 1 if report.failed else 0


def _judge(args) -> int:
    from ..distill.judge import judge

    factory = (lambda: make_backend(args)) if (args.model or args.server) else None
    counts = judge(args.input, args.out, factory, keep=args.keep, min_score=args.min_score, overwrite=args.overwrite,
                   max_tokens=args.max_tokens)
    print(f"qmm distill judge: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; rows in {args.out}")
    return 0


def _assemble(args) -> int:
    from ..data.tools.render import PageStyle
    from ..distill.assemble import assemble

    report = assemble(args.input, args.out, args.instruction, PageStyle(font_size=args.font_size), args.font,
                      overwrite=args.overwrite)
    print(f"qmm distill assemble: {report}; data section in {args.out}/stage3-data.yaml")
    return 0
