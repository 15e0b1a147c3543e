"""File safety of the dataset writer and the atomic checkpoint writers (issue 15 items 2, 7, 8, 9).

- a folder is replaced only if it is provably this project's dataset; files a user added to a
  dataset survive a re-conversion (carried over, with a note naming them);
- final files and folders follow the user's umask;
- temporaries of killed writers are removed by the next run (live writers' are left alone) and a
  kill between the two renames of the dataset swap is repaired on the next read or write;
- non-finite or absurd motion values are refused naming the file and the FLAME group, and every
  JSON written is strict (no ``NaN``/``Infinity``).

Leftover names follow one convention (``agents/checkpoint.py``): ``.<target>.tmp-<pid>@<host>.<hex>``
for temporaries and ``.<target>.old-<pid>@<host>`` for a dataset moved aside during its swap.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gdpo_listener.agents.checkpoint import atomic_save_torch, atomic_write_bytes, atomic_write_json, save_checkpoint
from gdpo_listener.envs.converters import ConversionError, ConversionWarning, convert_dualtalk
from gdpo_listener.envs.dataset import (
    SAMPLES_PER_FRAME,
    Conversation,
    DatasetFormatError,
    DatasetWriter,
    load_conversation,
    load_dataset_meta,
    read_split,
)

HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])


def leftover(target: str, kind: str, pid: int) -> str:
    """Name of a temporary (``kind="tmp"``) or moved-aside (``"old"``) entry of writer ``pid``."""
    return f".{target}.tmp-{pid}@{HOST}.0123abcd" if kind == "tmp" else f".{target}.old-{pid}@{HOST}"


def strict_json_constant(name: str):
    raise AssertionError(f"invalid JSON constant {name} written")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def conversation(cid: str, T: int = 60, seed: int = 0, scale: float = 1.0) -> Conversation:
    rng = np.random.default_rng(seed)
    motion = (scale * rng.standard_normal((2, T, 67))).astype(np.float32)  # (2, T, 67)
    return Conversation(cid, motion, np.ones((2, 6), bool), np.ones(2, bool), rng.random((2, T)) > 0.5,
                        [np.zeros(T * SAMPLES_PER_FRAME, np.float32) for _ in range(2)], [[""], [""]])


def write_dataset(out: Path, ids=("a",), seed: int = 0, **kw) -> Path:
    with DatasetWriter(out, source="test", **kw) as w:
        for i, cid in enumerate(ids):
            w.add(conversation(cid, seed=seed + i), "train")
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
# item 2: only this project's datasets are replaced; user files are never lost


FOREIGN = {
    "other json": (json.dumps({"name": "x"}), "format"),
    "malformed json": ("{not json", "JSON"),
    "other format": (json.dumps({"format": "someone-else", "version": 1}), "format"),
    "unsupported version": (json.dumps({"format": "gdpo-listener-dataset", "version": 99}), "version 99"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_folder_with_a_foreign_dataset_json_is_refused_before_any_work(tmp_path, case, write_dualtalk):
    text, why = FOREIGN[case]
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "dataset.json").write_text(text)
    (out / "images" / "a.txt").write_text("holiday")
    before = files(out)
    with pytest.raises(FileExistsError, match="not a canonical dataset") as e:
        DatasetWriter(out, source="test")
    assert str(out) in str(e.value) and why in str(e.value)
    assert files(out) == before and names(tmp_path) == ["out"]  # nothing touched, no temporary made
    # the converters refuse before reading any conversation
    inp = tmp_path / "in"
    write_dualtalk(inp, "c0", seconds=3, seed=0, speech=((0.5, 1.5), (1.8, 2.8)))
    import gdpo_listener.envs.converters.dualtalk as dt

    built = []
    real = dt.build_dualtalk_conversation
    dt.build_dualtalk_conversation = lambda *a, **k: built.append(a) or real(*a, **k)
    try:
        with pytest.raises(FileExistsError, match="not a canonical dataset"):
            convert_dualtalk(inp, out, vad="energy", verbose=False)
    finally:
        dt.build_dualtalk_conversation = real
    assert built == [] and files(out) == before and names(tmp_path) == ["in", "out"]


def test_files_a_user_added_survive_reconversion_with_a_note(tmp_path, capsys):
    out = write_dataset(tmp_path / "out", ids=("a", "b"))
    (out / "NOTES.txt").write_text("my notes")
    (out / "extra" / "deep").mkdir(parents=True)
    (out / "extra" / "deep" / "plot.png").write_bytes(b"\x89PNG...")
    (out / "conversations" / "mine.npz").write_bytes(b"not written by the writer")  # id in no split
    (out / "empty_dir").mkdir()
    (out / "preview_speaking.png").write_bytes(b"old preview")  # written by prepare_data: replaced
    capsys.readouterr()
    write_dataset(out, ids=("c",), seed=5)
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert (out / "extra" / "deep" / "plot.png").read_bytes() == b"\x89PNG..."
    assert (out / "conversations" / "mine.npz").read_bytes() == b"not written by the writer"
    assert (out / "empty_dir").is_dir()
    assert not (out / "preview_speaking.png").exists()
    assert read_split(out, "train") == ["c"] and not (out / "conversations" / "a.npz").exists()
    note = capsys.readouterr().out
    for rel in ("NOTES.txt", "extra/deep/plot.png", "conversations/mine.npz"):
        assert rel in note, note
    assert "preview_speaking.png" not in note
    assert names(tmp_path) == ["out"]


def test_a_user_file_in_the_way_of_the_new_dataset_is_refused_and_nothing_changes(tmp_path):
    out = write_dataset(tmp_path / "out", ids=("a",))
    (out / "conversations" / "b.npz").write_bytes(b"mine")  # not a conversation of this dataset
    before = files(out)
    with pytest.raises(DatasetFormatError, match="b.npz"):
        write_dataset(out, ids=("b",))
    assert files(out) == before and names(tmp_path) == ["out"]


# ----------------------------------------------------------------------------------------------
# item 7: the user's umask decides the permissions


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_dataset_and_checkpoint_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = write_dataset(tmp_path / "out")
        ck = save_checkpoint(tmp_path / "ck", "test", {"model": {"w": torch.zeros(3)}}, {"note": 1})
        atomic_save_torch(tmp_path / "ck" / "state.pt", {"step": 1})
    finally:
        os.umask(old)
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    for p in [out, *out.rglob("*")]:
        assert mode(p) == (want_dir if p.is_dir() else want_file), (p, oct(mode(p)))
    for name in ("model.safetensors", "meta.json", "state.pt"):
        assert mode(ck / name) == want_file, (name, oct(mode(ck / name)))


# ----------------------------------------------------------------------------------------------
# item 8: killed writers leave nothing the next run does not clean up or repair


def test_stale_dataset_temporaries_are_removed_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getppid()
    for pid in (dead, live):
        d = tmp_path / leftover("out", "tmp", pid)
        (d / "audio").mkdir(parents=True)
        (d / "audio" / "x.wav").write_bytes(b"half written")
    write_dataset(tmp_path / "out")
    assert names(tmp_path) == sorted(["out", leftover("out", "tmp", live)])


def test_stale_checkpoint_temporaries_are_removed_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getppid()
    for pid in (dead, live):
        (tmp_path / leftover("meta.json", "tmp", pid)).write_bytes(b"half")
        (tmp_path / leftover("model.safetensors", "tmp", pid)).write_bytes(b"half")
    atomic_write_json(tmp_path / "meta.json", {"a": 1})
    assert names(tmp_path) == sorted(["meta.json", leftover("meta.json", "tmp", live),
                                      leftover("model.safetensors", "tmp", live)])


def _killed_writer(out: str, die_at: str) -> None:
    """Child process: write a new dataset over ``out`` and die (``os._exit``) at ``die_at``."""
    import shutil

    real_replace = os.replace
    calls = []

    def replace(a, b):
        calls.append(1)
        if die_at == "second rename" and len(calls) == 2:
            os._exit(9)
        return real_replace(a, b)

    os.replace = replace
    if die_at == "cleanup":
        shutil.rmtree = lambda *a, **k: os._exit(9)
    write_dataset(Path(out), ids=("new",), seed=7)
    os._exit(0)


def kill_during_swap(out: Path, die_at: str) -> None:
    p = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(str(out), die_at))
    p.start()
    p.join(60)
    assert p.exitcode == 9, p.exitcode


def test_kill_between_the_two_renames_is_repaired_on_the_next_read(tmp_path):
    out = write_dataset(tmp_path / "out", ids=("old",))
    before = files(out)
    kill_during_swap(out, "second rename")
    assert not out.exists()  # the crash this test simulates: the dataset is only under .old-<pid>
    assert load_dataset_meta(out)["source"] == "test"  # the read puts the previous dataset back
    assert files(out) == before and read_split(out, "train") == ["old"]
    assert not [n for n in names(tmp_path) if ".old-" in n]


def test_kill_between_the_two_renames_is_repaired_on_the_next_write(tmp_path):
    out = write_dataset(tmp_path / "out", ids=("old",))
    (out / "NOTES.txt").write_text("keep")
    kill_during_swap(out, "second rename")
    write_dataset(out, ids=("again",))
    assert read_split(out, "train") == ["again"] and (out / "NOTES.txt").read_text() == "keep"
    assert names(tmp_path) == ["out"]  # the killed writer's .old- and .tmp- folders are gone


def test_kill_before_removing_the_previous_dataset_is_cleaned_on_the_next_read(tmp_path):
    out = write_dataset(tmp_path / "out", ids=("old",))
    kill_during_swap(out, "cleanup")
    assert any(".old-" in n for n in names(tmp_path))
    assert read_split(out, "train") == ["new"] and load_dataset_meta(out)
    assert names(tmp_path) == ["out"]


def test_legacy_old_pid_folder_is_restored(tmp_path):
    out = write_dataset(tmp_path / "out", ids=("old",))
    os.replace(out, tmp_path / f".out.old-{dead_pid()}")  # what the previous writer left after a kill
    assert load_conversation(out, "old", audio=False).n_frames == 60
    assert names(tmp_path) == ["out"]


# ----------------------------------------------------------------------------------------------
# item 9: absurd values are refused naming the file and group; every JSON is strict


@pytest.mark.parametrize("key, value, group", [("exp", 1e30, "expr"), ("pose", 1e39, "jaw")])
def test_absurd_or_overflowing_motion_is_refused_naming_file_and_group(tmp_path, key, value, group, write_dualtalk):
    inp = tmp_path / "in"
    for i, cid in enumerate(("ok", "bad")):
        write_dualtalk(inp, cid, seconds=3, seed=i, speech=((0.5, 1.5), (1.8, 2.8)))
    d = {k: v.astype(np.float64) for k, v in np.load(inp / "bad_speaker1.npz").items()}
    d[key][7, 4] = value  # pose channel 4 = jaw; float64 1e39 is inf in float32
    np.savez(inp / "bad_speaker1.npz", **d)
    with pytest.warns(ConversionWarning, match="bad_speaker1.npz") as rec:
        s = convert_dualtalk(inp, tmp_path / "out", vad="energy", verbose=False)
    msg = " | ".join(str(w.message) for w in rec)
    assert f"FLAME group {group!r}" in msg and "frame 7" in msg, msg
    assert s["conversations"] == 1
    json.loads((tmp_path / "out" / "dataset.json").read_text(), parse_constant=strict_json_constant)
    with pytest.raises(ConversionError, match=f"bad_speaker1.npz.*FLAME group '{group}'"):
        convert_dualtalk(inp, tmp_path / "out2", vad="energy", strict=True, verbose=False)


def test_writer_refuses_absurd_motion_from_any_source(tmp_path):
    with pytest.raises(DatasetFormatError, match="conversation 'x'.*'expr'"):
        with DatasetWriter(tmp_path / "out", source="test") as w:
            w.add(conversation("x", scale=1e30), "train")
    assert names(tmp_path) == []


def test_dataset_json_is_strict_and_a_non_finite_value_names_the_file(tmp_path):
    out = write_dataset(tmp_path / "out", ids=("a",))
    before = files(out)
    with pytest.raises(DatasetFormatError, match=r"dataset\.json.*'bad\.x'"):
        write_dataset(out, ids=("b",), extra_meta={"bad": {"x": float("inf")}})
    assert files(out) == before and names(tmp_path) == ["out"]


def test_atomic_write_json_is_strict(tmp_path):
    with pytest.raises(ValueError, match=r"meta\.json.*'loss\[1\]'"):
        atomic_write_json(tmp_path / "meta.json", {"loss": [1.0, float("nan")]})
    assert names(tmp_path) == []
    atomic_write_bytes(tmp_path / "b", b"x")
    assert (tmp_path / "b").read_bytes() == b"x"


@pytest.mark.slow
def test_synthetic_workers_die_with_their_parent(tmp_path):
    """A killed corpus generation leaves no worker processes behind (issue 15 item 8)."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import os, sys; from gdpo_listener.envs.synthetic import generate_corpus; "
            f"generate_corpus({str(tmp_path / 'out')!r}, n_conversations=40, seconds=64, workers=2, progress=False)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    workers: list[int] = []
    for _ in range(300):  # wait for the two workers to start
        time.sleep(0.1)
        out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        workers = [int(p) for p in out]
        if len(workers) >= 2:
            break
    assert len(workers) >= 2, "the corpus generation did not start its workers"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        alive = [p for p in workers if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived their killed parent"
