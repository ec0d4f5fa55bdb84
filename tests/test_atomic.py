"""atomic: whole files and folders put in place by rename, exclusive creation, and the cleanup of what a
killed writer left behind."""

import os
import subprocess
import sys

import pytest

from lorakit import atomic


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(target, kind="tmp"):
    """A temporary of `target` as a killed writer (a dead process of this host) would have left it."""
    name = atomic.temp_name(target, kind).name.split("-")
    name[2] = str(dead_pid())
    return target.with_name("-".join(name))


def test_write_file_replaces_whole_and_exclusive_refuses(tmp_path):
    path = tmp_path / "f.json"
    atomic.write_file(path, "one")
    atomic.write_file(path, b"two")
    assert path.read_text() == "two"
    with pytest.raises(FileExistsError):
        atomic.write_file(path, "three", overwrite=False)
    assert path.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_write_dir_swaps_whole_folder_and_keeps_the_other_files(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    (target / "README.md").write_text("notes")
    inode = (target / "README.md").stat().st_ino

    atomic.write_dir(target, lambda tmp: (tmp / "weights").write_text("new"), replaced=lambda name: name == "weights")
    assert (target / "weights").read_text() == "new"
    assert (target / "README.md").read_text() == "notes" and (target / "README.md").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_folder_holding_other_folders_or_the_current_one_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "x").write_text("kept")
    with pytest.raises(FileExistsError, match="holds sub, which is not part of what is written there"):
        atomic.write_dir(target, lambda tmp: (tmp / "w").write_text("new"), replaced=lambda name: name == "w")
    monkeypatch.chdir(target / "sub")
    with pytest.raises(FileExistsError, match="holds the current folder"):
        atomic.write_dir(target, lambda tmp: (tmp / "w").write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (target / "sub" / "x").read_text() == "kept"
    assert os.listdir(target) == ["sub"]


def test_a_failing_fill_or_check_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "a").write_text("old")

    def fill(tmp):
        (tmp / "a").write_text("new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_dir(target, fill)

    def refuse(path):
        raise FileExistsError(f"{path} is taken")

    with pytest.raises(FileExistsError, match="is taken"):
        atomic.write_dir(target, lambda tmp: (tmp / "a").write_text("new"), check=refuse)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "adapter"
    stale_dir, stale_file = leftover(target), leftover(tmp_path / "best.safetensors")
    stale_dir.mkdir()
    (stale_dir / "half").write_text("x")
    stale_file.write_text("x")
    mine = atomic.temp_name(target)  # a live writer's (this process): never touched
    mine.mkdir()
    other = tmp_path / ".adapter.tmp-otherhost-1-0123abcd"  # another host's: cannot be checked, so kept
    other.mkdir()

    atomic.write_dir(target, lambda tmp: (tmp / "w").write_text("new"))
    assert not stale_dir.exists() and stale_file.exists()
    assert mine.exists() and other.exists()
    atomic.write_file(tmp_path / "best.safetensors", b"w")
    assert not stale_file.exists()


def test_a_swap_stopped_between_its_two_renames_is_undone(tmp_path):
    """Where the folder exchange is unsupported a swap is two renames; a kill between them leaves the old
    folder aside, and the next write to the place puts it back before anything else."""
    target = tmp_path / "checkpoint"
    aside = leftover(target, "old")
    aside.mkdir()
    (aside / "state").write_text("old")
    seen = {}

    def check(path):
        seen["state"] = (path / "state").read_text()

    atomic.write_dir(target, lambda tmp: (tmp / "state").write_text("new"), check=check)
    assert seen["state"] == "old" and (target / "state").read_text() == "new" and not aside.exists()


def test_clean_folder_removes_dead_writers_temporaries_of_any_entry(tmp_path):
    stale = [leftover(tmp_path / name) for name in ("checkpoint", "metrics.jsonl", "curves.png")]
    for p in stale:
        p.write_text("x")
    (tmp_path / "keep.txt").write_text("x")
    removed = atomic.clean_folder(tmp_path)
    assert sorted(removed) == sorted(stale) and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("this filesystem cannot exchange two folders; the two-rename path is tested above")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_append_line_writes_whole_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    atomic.append_line(path, '{"a": 1}')
    atomic.append_line(path, '{"a": 2}\n')
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_two_writers_of_one_new_folder_take_turns(tmp_path):
    """The check that a place is free and the write happen under one lock: of two processes creating the
    same folder with a check that refuses an existing one, exactly one succeeds."""
    code = (
        "import sys, time; from pathlib import Path; from lorakit import atomic\n"
        "def fill(tmp):\n"
        "    time.sleep(0.3); (tmp / 'who').write_text(sys.argv[1])\n"
        "def free(path):\n"
        "    if path.exists(): raise FileExistsError(path)\n"
        "try:\n"
        f"    atomic.write_dir(Path({str(tmp_path / 'out')!r}), fill, check=free)\n"
        "except FileExistsError:\n"
        "    sys.exit(3)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, name]) for name in ("first", "second")]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes == [0, 3]
    assert (tmp_path / "out" / "who").read_text() in ("first", "second")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert os.listdir(tmp_path / "out") == ["who"]


def test_a_folder_reached_through_a_link_is_written_where_the_link_points(tmp_path):
    real = tmp_path / "disk" / "adapter"
    real.mkdir(parents=True)
    (real / "w").write_text("old")
    link = tmp_path / "adapter"
    link.symlink_to(real)
    atomic.write_dir(link, lambda tmp: (tmp / "w").write_text("new"))
    assert link.is_symlink() and (real / "w").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "disk"]
