"""The GPU check's CPU side (docs/gpu-check.md): the `gpu`/`te` markers, the wheel set's checks,
a missing wheel stopping scripts/gpu-check.sh at the start, and bench/bench_gpu.py's code path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import NO_CUDA, NO_TE, marker_skip_reason

REPO = Path(__file__).resolve().parents[1]
MEGATRON = "megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
TIMEOUT = "pytest_timeout-2.4.0-py3-none-any.whl"
ZLIB_NG = "zlib_ng-1.1.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"


def _as_on_the_gpu_machine() -> dict:
    """The environment of `gpu-check.sh --dry-run`: what the GPU machine lacks cannot be imported."""
    path = os.pathsep.join([str(REPO / "scripts" / "gpu_image"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _wheelset():
    spec = importlib.util.spec_from_file_location("wheelset", REPO / "scripts" / "wheelset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder: Path, name: str, requires: str = "numpy") -> Path:
    """A small zip with a wheel's METADATA (the checks read names, tags, sizes and METADATA)."""
    path = folder / name
    dist = "-".join(name.split("-")[:2])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Name: x\nRequires-Dist: {requires}\n"
                                                 "Requires-Dist: sphinx; extra == \"docs\"\n")
    return path


@pytest.mark.parametrize("markers, cuda, te, expected", [
    ({"gpu"}, False, False, NO_CUDA),
    ({"gpu", "te"}, False, False, NO_CUDA),
    ({"gpu"}, True, False, None),  # the GPU check's machine: CUDA, no Transformer Engine
    ({"gpu", "te"}, True, False, NO_TE),
    ({"gpu", "te"}, True, True, None),
    (set(), False, False, None),
])
def test_marker_skip_reasons(markers, cuda, te, expected):
    assert marker_skip_reason(markers, cuda, te) == expected


def test_te_without_gpu_mark_is_refused():
    with pytest.raises(pytest.UsageError, match="marked `gpu` too"):
        marker_skip_reason({"te"}, cuda=True, te=True)


def test_gpu_selection_names_the_te_tests_it_leaves_out(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: x\n    te: y\n")
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (tmp_path / "test_marks.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_engine():\n    pass\n\n"
        "@pytest.mark.gpu\n@pytest.mark.te\ndef test_fp8():\n    pass\n\ndef test_cpu():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-rs",
                           "-m", "gpu and not te", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "1 skipped, 2 deselected" in out, out  # test_engine: no CUDA here
    assert f"NOT RUN test_marks.py::test_fp8: {NO_TE}" in out, out
    assert "test_cpu" not in out.split("tests not selected")[-1], out


def test_wheelset_writes_and_verifies_a_manifest(tmp_path, capsys):
    ws = _wheelset()
    _wheel(tmp_path, MEGATRON, "torch>=2.6.0")
    _wheel(tmp_path, TIMEOUT, "pytest>=7.0.0")
    _wheel(tmp_path, ZLIB_NG)
    ws.write(tmp_path)
    listing = capsys.readouterr().out
    assert MEGATRON in listing and "torch>=2.6.0" in listing and "sphinx" not in listing
    manifest = (tmp_path / "MANIFEST").read_text().splitlines()
    digest, size, name = manifest[0].split()
    assert name == MEGATRON and int(size) == (tmp_path / MEGATRON).stat().st_size
    assert digest == hashlib.sha256((tmp_path / MEGATRON).read_bytes()).hexdigest()
    ws.verify(tmp_path)
    data = bytearray((tmp_path / MEGATRON).read_bytes())
    data[-1] ^= 0xFF  # a damaged copy of the same size: only the checksum tells
    (tmp_path / MEGATRON).write_bytes(bytes(data))
    with pytest.raises(ws.WheelError, match=f"{MEGATRON} differs from its .*MANIFEST"):
        ws.verify(tmp_path)


@pytest.mark.parametrize("names, error", [
    ([TIMEOUT, ZLIB_NG], "no wheel for megatron-core"),
    ([MEGATRON, TIMEOUT], "no wheel for zlib-ng"),
    ([MEGATRON, TIMEOUT, ZLIB_NG, "megatron_core-0.15.0-cp312-cp312-manylinux_2_28_x86_64.whl"],
     "2 wheels of megatron-core"),
    (["megatron_core-0.16.1-cp311-cp311-manylinux_2_28_x86_64.whl", TIMEOUT, ZLIB_NG], "not CPython 3.12"),
    (["megatron_core-0.16.1-cp312-cp312-manylinux_2_28_aarch64.whl", TIMEOUT, ZLIB_NG], "not x86-64"),
    ([MEGATRON, TIMEOUT, ZLIB_NG, "nvtx-0.2.17-cp312-cp312-manylinux_2_28_x86_64.whl"], "does not name: nvtx"),
])
def test_wheelset_refuses_a_wrong_set(tmp_path, names, error):
    ws = _wheelset()
    for name in names:
        _wheel(tmp_path, name)
    with pytest.raises(ws.WheelError, match=error):
        ws.write(tmp_path)
    assert not (tmp_path / "MANIFEST").exists()


def test_gpu_check_stops_at_the_start_naming_the_missing_wheel(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, TIMEOUT)
    (wheels / "MANIFEST").write_text(f"{hashlib.sha256((wheels / TIMEOUT).read_bytes()).hexdigest()}  "
                                     f"{(wheels / TIMEOUT).stat().st_size}  {TIMEOUT}\n")
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--out", str(tmp_path / "out")],
                          env={**os.environ, "QMM_WHEELS": str(wheels), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("gpu-check: ") and "no wheel for megatron-core" in lines[-1], done.stdout
    assert "Traceback" not in done.stdout and "pip install" not in done.stdout
    assert (tmp_path / "out" / "gpu-check.log").read_text() == done.stdout


def test_the_gpu_machine_stand_in_blocks_what_it_lacks():
    code = "import torch, megatron.core, PIL\ntry:\n    import nvidia.dali\nexcept ImportError as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code], env=_as_on_the_gpu_machine(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No module named 'nvidia.dali' (the GPU check's machine lacks it)" in done.stdout


def test_gpu_selection_collects_without_what_the_gpu_machine_lacks():
    """A test module importing DALI, PyAV or pyarrow at the top would stop the GPU run's collection."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", "-m",
                           "gpu and not te", "tests"], cwd=REPO, env=_as_on_the_gpu_machine(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("tests/") and "::" in line for line in lines), done.stdout[-3000:]
    assert any(line.startswith("NOT RUN tests/") and line.endswith(NO_TE) for line in lines), done.stdout[-3000:]


def test_bench_gpu_code_path_on_cpu(tmp_path):
    """--device cpu --tiny: the whole benchmark (data pipeline, engine steps, FLOPs, the planner's
    memory, JSON, table) on the tiny model with the CPU engine, without DALI, PyAV, pyarrow or
    einops, as on the GPU machine. Numbers are checked for sense only."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], env=_as_on_the_gpu_machine(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert r["engine"] == "CPUEngine" and r["preset"] == "tiny"
    assert len(r["step_s"]) == len(r["losses"]) == 2 and r["skipped_steps"] == 0
    assert all(6.0 < loss < 8.0 for loss in r["losses"]), r["losses"]  # ~ln(1000) at random init
    # 2 packed sequences of 512 tokens (padded to full length) per step, images of 8x8 patches.
    assert r["tokens_per_step"] == 2 * 512 and r["patches_per_step"] % 64 == 0
    assert r["tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops"] / report["matmul_tflops"])
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"][1])
    assert r["peak_allocated_gib"] is None  # no allocator to read on CPU; never a made-up number
    breakdown = r["predicted_breakdown_gib"]
    assert breakdown["weights"] > 0 and breakdown["activations"] > 0
    assert r["predicted_allocator_gib"] == pytest.approx(r["predicted_gib"] - breakdown["fixed_overhead"])
    table = done.stdout.strip().splitlines()
    assert table[-2].split()[0] == "tiny" and table[-3].split()[0] == "preset", done.stdout[-2000:]
