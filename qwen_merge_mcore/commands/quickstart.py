NAME = "quickstart"
HELP = ("The tiny end-to-end run on CPU: fixtures -> qmm build -> qmm hf2mcore (TP=2) -> stages 1, 2.1, 2.2, 3 on "
        "generated data (2 processes, TP=2 on gloo) -> qmm mcore2hf -> a reply generated with transformers.")
EXAMPLES = ["qmm quickstart --workdir work/quickstart", "qmm quickstart --workdir /tmp/qs --steps 6"]


def add_arguments(p) -> None:
    p.add_argument("--workdir", default="work/quickstart", help="folder for every output (models, data, runs, export)")
    p.add_argument("--steps", type=int, default=None, help="training steps per stage (default: the tiny configs')")


def run(args) -> int:
    import json

    from ..quickstart import Quickstart

    results = Quickstart(args.workdir, args.steps).run()
    print(json.dumps({k: v for k, v in results.items() if k != "seconds"}, indent=1))
    print(f"quickstart finished in {results['total_seconds']:.0f} s; everything is in {args.workdir}")
    return 0
