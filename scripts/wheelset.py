"""The wheel set that travels to the GPU check's machine (docs/gpu-check.md), and what the GPU path
needs there. Standard library only: it runs there before anything is installed.

    python scripts/wheelset.py write FOLDER      # after `pip download` (gpu-wheels.sh): MANIFEST + list
    python scripts/wheelset.py verify FOLDER     # before installing (gpu-check.sh): all there and intact
    python scripts/wheelset.py installed FOLDER [--cuda]   # after installing: the GPU path imports

`write` checks that FOLDER holds one wheel for each name in requirements/gpu-check.txt, each
for CPython 3.12 on x86-64, and that the wheels and the working tree that travels with them
stay under the device's 64 MiB; then writes FOLDER/MANIFEST (sha256, bytes, file) and prints
the list with each wheel's requirements. `verify` checks the same names against MANIFEST and
every file's size and checksum. `installed` checks that Python imports each wheel's version and
every package the GPU path needs (`--cuda`: and sees a GPU). Each prints one line naming the
problem and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements" / "gpu-check.txt"
LIMIT = 64 * 2**20  # what travels to the device machine: the working tree plus carried paths
PYTHON_TAGS = {"cp312", "py3", "py312"}
# What the engine path, the GPU tests and bench/bench_gpu.py import, module -> package.
GPU_PATH_IMPORTS = {
    "torch": "torch", "megatron.core": "megatron-core", "transformers": "transformers", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm", "psutil": "psutil", "PIL": "pillow",
    "jinja2": "jinja2", "numpy": "numpy", "pytest": "pytest", "pytest_timeout": "pytest-timeout",
    "zlib_ng": "zlib-ng",
}
REFRESH = "run `bash scripts/gpu-wheels.sh` where PyPI is reachable, then carry the folder"


class WheelError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required() -> list[str]:
    names = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(canonical(re.split(r"[<>=!~\[; ]", line, 1)[0]))
    return names


def parse_wheel(filename: str) -> tuple[str, str, str, str, str]:
    """(distribution, version, python, abi, platform tags) from a wheel's file name."""
    parts = filename[:-len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) not in (5, 6):
        raise WheelError(f"{filename}: not a wheel file name")
    return canonical(parts[0]), parts[1], parts[-3], parts[-2], parts[-1]


def check_fits_target(filename: str) -> None:
    _, _, python, abi, platform = parse_wheel(filename)
    stable_abi = abi == "abi3" and any(re.fullmatch(r"cp3(\d+)", t) and int(t[3:]) <= 12 for t in python.split("."))
    if not PYTHON_TAGS & set(python.split(".")) and not stable_abi:
        raise WheelError(f"{filename}: built for {python}-{abi}, not CPython 3.12")
    if platform != "any" and not all("x86_64" in p for p in platform.split(".")):
        raise WheelError(f"{filename}: built for {platform}, not x86-64 Linux")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def requirements_of(path: Path) -> list[str]:
    """The wheel's own Requires-Dist lines, extras left out."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln]


def travelling_tree_bytes() -> int:
    """Tracked and untracked-not-ignored files of the checkout: what the device tool sends."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0  # not a git checkout: only the wheels are counted
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def match_required(files: list[str], folder: Path) -> dict[str, str]:
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(parse_wheel(f)[0], []).append(f)
    for name, found in by_name.items():
        if len(found) > 1:
            raise WheelError(f"{folder}/ holds {len(found)} wheels of {name} ({', '.join(found)}): keep one; "
                             + REFRESH)
    missing = [n for n in required() if n not in by_name]
    if missing:
        raise WheelError(f"{folder}/ has no wheel for {', '.join(missing)}: {REFRESH}")
    return {name: by_name[name][0] for name in required()}


def write(folder: Path) -> None:
    files = sorted(p.name for p in folder.glob("*.whl"))
    wheels = match_required(files, folder)
    extra = sorted(set(files) - set(wheels.values()))
    if extra:
        raise WheelError(f"{folder}/ holds wheels requirements/gpu-check.txt does not name: {', '.join(extra)}")
    for f in files:
        check_fits_target(f)
    sizes = {f: (folder / f).stat().st_size for f in files}
    total, tree = sum(sizes.values()), travelling_tree_bytes()
    if total + tree > LIMIT:
        raise WheelError(f"the wheels ({total / 2**20:.1f} MiB) and the working tree ({tree / 2**20:.1f} MiB) "
                         f"exceed the device's {LIMIT / 2**20:.0f} MiB")
    tmp = folder / "MANIFEST.tmp"
    tmp.write_text("".join(f"{sha256(folder / f)}  {sizes[f]}  {f}\n" for f in files))
    os.replace(tmp, folder / "MANIFEST")
    print(f"{'wheel':<76} {'MiB':>7}  requires")
    for f in files:
        print(f"{f:<76} {sizes[f] / 2**20:>7.2f}  {', '.join(requirements_of(folder / f)) or '-'}")
    print(f"{'total':<76} {total / 2**20:>7.2f}  (+ {tree / 2**20:.2f} MiB working tree; device limit "
          f"{LIMIT / 2**20:.0f} MiB)")


def verify(folder: Path) -> None:
    manifest = folder / "MANIFEST"
    if not manifest.is_file():
        raise WheelError(f"{manifest} is missing: {REFRESH}")
    entries = {}
    for line in manifest.read_text().splitlines():
        digest, size, name = line.split(None, 2)
        entries[name] = (digest, int(size))
    wheels = match_required(list(entries), folder)
    for name in wheels.values():
        path, (digest, size) = folder / name, entries[name]
        if not path.is_file():
            raise WheelError(f"{path} is listed in {manifest} but missing: {REFRESH}")
        if path.stat().st_size != size or sha256(path) != digest:
            raise WheelError(f"{path} differs from its {manifest} entry (size or sha256; a partial copy?): {REFRESH}")
        check_fits_target(name)
    total = sum(size for _, size in entries.values())
    print(f"wheels: {', '.join(sorted(wheels.values()))} ({total / 2**20:.1f} MiB) match {manifest}")


def installed(folder: Path, cuda: bool) -> None:
    import importlib
    import importlib.metadata

    missing = []
    for module, package in GPU_PATH_IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - ImportError, or a package failing as it loads
            missing.append(f"{package} ({type(err).__name__}: {err})")
    if missing:
        raise WheelError(f"the GPU path cannot import {'; '.join(missing)}: add the package to "
                         "requirements/gpu-check.txt and rerun scripts/gpu-wheels.sh")
    for line in (folder / "MANIFEST").read_text().splitlines():
        dist, version = parse_wheel(line.split(None, 2)[2])[:2]
        found = importlib.metadata.version(dist)
        if found != version:
            raise WheelError(f"Python imports {dist} {found}, not the wheel's {version} (another copy earlier on "
                             "sys.path?)")
    import torch

    if cuda and not torch.cuda.is_available():
        raise WheelError("torch sees no CUDA GPU on this machine")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} ({gpu}), transformers "
          f"{importlib.metadata.version('transformers')}, megatron-core {importlib.metadata.version('megatron-core')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "verify", "installed"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cuda", action="store_true", help="installed: require a CUDA GPU")
    parser.add_argument("--name", default="wheelset", help="the command named in error lines")
    args = parser.parse_args(argv)
    try:
        if args.action == "installed":
            installed(args.folder, args.cuda)
        else:
            (write if args.action == "write" else verify)(args.folder)
    except WheelError as err:
        print(f"{args.name}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
