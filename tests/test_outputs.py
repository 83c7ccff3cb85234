"""Outputs never destroy inputs, file-system failures read as one line, and killed runs leave no
temp folder behind that later runs ignore (qwen_merge_mcore/utils/atomic.py and its callers)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from qwen_merge_mcore.cli import main
from qwen_merge_mcore.utils.atomic import OutputExistsError, atomic_output_dir, owner_tag


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"qmm {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def inputs(tiny, tmp_path):
    """Copies of the tiny models (the tests try to make commands destroy them)."""
    def copy(name):
        dst = tmp_path / f"in-{name}"
        if not dst.exists():
            shutil.copytree(tiny[name], dst)
        return dst
    return copy


@pytest.mark.parametrize("case", ["hf2mcore", "mcore2hf-parent", "build", "merge", "convert", "render-parent"])
def test_an_output_that_would_replace_or_contain_an_input_is_refused(case, inputs, tmp_path, capsys):
    qwen3 = inputs("qwen3")
    rows = tmp_path / "questions" / "q.jsonl"
    rows.parent.mkdir()
    rows.write_text('{"question": "2+2?", "answer": "4"}\n')
    argv, victim = {
        "hf2mcore": (["hf2mcore", "--hf", str(qwen3), "--out", str(qwen3), "--overwrite"], qwen3),
        # the output folder holds the input: replacing it would delete the input with it
        "mcore2hf-parent": (["mcore2hf", "--mcore", str(qwen3), "--out", str(tmp_path), "--overwrite"], qwen3),
        "build": (["build", "--vlm", str(inputs("qwen2_5_vl")), "--llm", str(qwen3), "--out", str(qwen3),
                   "--overwrite"], qwen3),
        "merge": (["merge", "--method", "linear", "--model", str(qwen3), "--model", str(inputs("qwen3-tied")),
                   "--out", str(qwen3), "--overwrite"], qwen3),
        "convert": (["data", "convert", "--style", "recap", "--input", str(rows.parent), "--out", str(rows.parent),
                     "--overwrite"], rows.parent),
        "render-parent": (["data", "render", "--input", str(rows), "--out", str(rows.parent), "--overwrite"],
                          rows.parent),
    }[case]
    before = _tree(victim)
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err, " ".join(argv[:2]) if argv[0] == "data" else argv[0])
    assert "would delete the input" in line and str(victim) in line
    assert _tree(victim) == before


def _mount(path, options):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a tmpfs folder under tmp_path, unmounted at the end."""
    mounted = []

    def mount(name, options):
        path = tmp_path / name
        _mount(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def _merge_argv(inputs, out):
    return ["merge", "--method", "linear", "--model", str(inputs("qwen3")), "--model", str(inputs("qwen3-tied")),
            "--out", str(out), "--no-progress"]


@pytest.mark.parametrize("command", ["merge", "hf2mcore"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, inputs, tmpfs, capfd):
    disk = tmpfs("full", "size=512k")  # the tiny model's weights alone are 2 MB
    out = disk / "out"
    argv = _merge_argv(inputs, out) if command == "merge" else \
        ["hf2mcore", "--hf", str(inputs("qwen3")), "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capfd.readouterr().err
    line = _one_error_line(err, command)
    assert f"cannot write {out}: no space left" in line, line
    assert "UserWarning" not in err and "FutureWarning" not in err  # the ranks' third-party warnings are quiet
    assert list(disk.iterdir()) == []  # no output, no temp folder


def test_a_read_only_folder_and_a_file_in_the_way_are_one_line(inputs, tmpfs, tmp_path, capsys):
    readonly = tmpfs("ro", "size=1m,ro")
    assert main(_merge_argv(inputs, readonly / "out")) == 1
    line = _one_error_line(capsys.readouterr().err, "merge")
    assert str(readonly) in line and "Read-only file system" in line, line
    assert main(_merge_argv(inputs, readonly / "sub" / "out")) == 1
    line = _one_error_line(capsys.readouterr().err, "merge")
    assert f"{readonly / 'sub'}" in line and "Read-only file system" in line, line

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_merge_argv(inputs, blocker)) == 1
    assert "exists and is a file, not a folder" in _one_error_line(capsys.readouterr().err, "merge")
    assert main(_merge_argv(inputs, blocker / "out")) == 1
    assert str(blocker) in _one_error_line(capsys.readouterr().err, "merge")
    assert blocker.read_text() == "not a folder"


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from qwen_merge_mcore.utils.atomic import atomic_output_dir
    with atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_a_killed_run_leaves_a_temp_folder_that_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    left = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(left) and not out.exists()
    # Folders of a live process (this one) and of another host's process are not this run's to remove.
    live = tmp_path / f".out.tmp-{owner_tag()}-abc"
    elsewhere = tmp_path / ".out.tmp-other-node-4026531836-7-abc"  # host other-node, its pid namespace
    live.mkdir()
    elsewhere.mkdir()

    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert not os.path.exists(left)
    assert live.is_dir() and elsewhere.is_dir()
    assert (out / "done").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, elsewhere.name])

    # Killed between moving the previous output aside and renaming the new one into place: the
    # previous output comes back (and is then protected like any existing output).
    previous = tmp_path / f".again.old-{owner_tag().rsplit('-', 1)[0]}-{proc.pid}-0"
    previous.mkdir()
    (previous / "done").write_text("previous")
    with pytest.raises(OutputExistsError):
        with atomic_output_dir(tmp_path / "again"):
            pass
    assert (tmp_path / "again" / "done").read_text() == "previous" and not previous.exists()
