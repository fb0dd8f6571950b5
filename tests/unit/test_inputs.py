"""Inputs of bulk labelling without Ray: tar streams, member paths, concurrent reads, shard plans, parts."""

import gzip
import io
import json
import os
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import add_tar_member

from imgcls import storage
from imgcls.inference.finished import COUNTS_KEY
from imgcls.inference.sink import done_shards, part_counts, part_name, write_part_atomic
from imgcls.inference.inputs import cut_runs, plan_inputs
from imgcls.inference.schema import COL_ERROR_TYPE, COL_PATH, COL_STATUS, STATUS_ERROR, STATUS_OK
from imgcls.errors import (ERROR_DECODE, ERROR_EMPTY, ERROR_READ, ERROR_TAR, ERROR_TOO_LARGE, ERROR_TYPES,
    ERROR_UNSUPPORTED, error_type)
from imgcls.inference.decode import Decoder
from imgcls.inference.read import iter_tar, member_path, read_input, split_member


@pytest.fixture(scope="module")
def jpeg(dogs_cats_root):  # a real photo's file (PNG in this set)
    name = sorted(os.listdir(os.path.join(dogs_cats_root, "cat")))[0]
    with open(os.path.join(dogs_cats_root, "cat", name), "rb") as f:
        return f.read()


def planned_paths(plan):
    """The paths of each planned shard, in shard order."""
    return [pq.read_table(u)[COL_PATH].to_pylist() for u in plan.shard_table()["list"].to_pylist()]


def rows(paths, max_bytes=256 * 2**20, max_pixels=64_000_000):
    """(path, status, error, error_type) per row the decoder gives for ``paths``."""
    out = [c for c in Decoder(32, max_pixels, max_images=4, max_bytes=max_bytes).chunks(paths)]
    return [r for c in out for r in zip(c[COL_PATH], c[COL_STATUS], c["error"], c[COL_ERROR_TYPE])]


def test_member_paths_round_trip_on_any_store():
    for tar in ("s3://bucket/shards/000001.tar", "gs://b/x.TAR", "/data/a b/c.tar.gz", "az://c/d.tgz"):
        for member in ("cat.jpg", "images/cat #1.jpg", "a.tar#b.jpg"):
            assert split_member(member_path(tar, member)) == (tar, member)
    assert split_member("s3://bucket/plain/cat.jpg") == ("s3://bucket/plain/cat.jpg", None)
    assert "::" not in member_path("s3://b/x.tar", "m.jpg")  # fsspec's chaining separator


def test_tar_members_stream_with_errors_for_every_broken_tar(jpeg, tmp_path):
    """Every member gets a row; a tar that yields no member rows (empty, truncated in its
    first header, a gzip bomb named .tar, not a tar) still gets one error row under its own path."""
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tar:
        add_tar_member(tar, "a.jpg", jpeg)
        add_tar_member(tar, "big.jpg", jpeg + b"\0" * 5000)  # over the 4,000-byte cap below
        add_tar_member(tar, "b.jpg", jpeg)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:len(jpeg) + 700])  # a.jpg whole, then cut inside big.jpg
    bomb = tmp_path / "bomb.tar"  # 200 MB of zeros, gzipped to about 200 KB
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        for _ in range(200):
            f.write(b"\0" * 2**20)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive" * 100)
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    missing = tmp_path / "missing.tar"
    cap = max(len(jpeg) + 1000, 4000)
    got = rows([str(good), str(empty), str(truncated), str(bomb), str(garbage), str(zero), str(missing)],
               max_bytes=cap)
    by_path = {p: (s, e, t) for p, s, e, t in got}
    assert len(by_path) == len(got)  # one row per path
    assert by_path[member_path(str(good), "a.jpg")] == (STATUS_OK, None, None)
    assert by_path[member_path(str(good), "b.jpg")][0] == STATUS_OK
    big = by_path[member_path(str(good), "big.jpg")]
    assert "exceeds" in big[1] and big[2] == ERROR_TOO_LARGE
    assert by_path[str(empty)] == (STATUS_ERROR, "EmptyTarError: tar archive holds no files", ERROR_EMPTY)
    assert by_path[str(zero)] == (STATUS_ERROR, "EmptyTarError: empty tar file", ERROR_EMPTY)
    assert by_path[member_path(str(truncated), "a.jpg")][0] == STATUS_OK
    # Ended early: an error under the tar's own path.
    assert by_path[str(truncated)] == (STATUS_ERROR, "BrokenTarError: broken tar archive: unexpected end of data",
                                       ERROR_TAR)
    assert by_path[str(bomb)][::2] == (STATUS_ERROR, ERROR_EMPTY)  # 200 MB of zeros: a tar's end marker
    assert by_path[str(garbage)] == (STATUS_ERROR, "BrokenTarError: broken tar archive: invalid header", ERROR_TAR)
    assert by_path[str(missing)][::2] == (STATUS_ERROR, ERROR_READ)
    assert by_path[str(missing)][1].startswith("FileNotFoundError: ")
    assert len(got) == 3 + 1 + 2 + 1 + 1 + 1 + 1


def test_tar_is_read_one_member_at_a_time(jpeg, tmp_path):
    """iter_tar is a stream: the first member arrives before the rest of the tar is read."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(50):
            add_tar_member(tar, f"{i}.jpg", jpeg)
    stream = iter_tar(str(shard))
    name, data = next(stream)
    assert name == member_path(str(shard), "0.jpg") and data == jpeg
    assert read_input(member_path(str(shard), "49.jpg")) == jpeg
    with pytest.raises(FileNotFoundError):
        read_input(member_path(str(shard), "nope.jpg"))


def test_every_tar_member_but_a_folder_is_a_row_hard_links_with_their_targets_bytes(jpeg, tmp_path):
    """`tar` stores a file added twice (or a file with two names) as a hard link to the
    first: the link is a row with the target's bytes, not a member skipped. A symbolic
    link, and a hard link to no file in the archive, are error rows; a folder is no row."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg)
    os.link(photo, tmp_path / "same.jpg")  # two names, one file
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(photo, arcname="a.jpg")
        tar.add(photo, arcname="again.jpg")  # the same file added twice: a link to a.jpg
        tar.add(tmp_path / "same.jpg", arcname="x/same.jpg")  # a second name: a link to a.jpg
        for name, kind, target in (("sym.jpg", tarfile.SYMTYPE, "a.jpg"), ("lost.jpg", tarfile.LNKTYPE, "gone.jpg"),
                                   ("x", tarfile.DIRTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
        add_tar_member(tar, "b.png", b"not a png")
    with tarfile.open(shard) as tar:
        assert [m.type for m in tar.getmembers()][:3] == [tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.LNKTYPE]
    got = dict(iter_tar(str(shard)))
    m = lambda name: member_path(str(shard), name)  # noqa: E731
    assert sorted(got) == sorted(m(n) for n in ("a.jpg", "again.jpg", "x/same.jpg", "sym.jpg", "lost.jpg", "b.png"))
    assert got[m("a.jpg")] == got[m("again.jpg")] == got[m("x/same.jpg")] == jpeg and got[m("b.png")] == b"not a png"
    assert str(got[m("sym.jpg")]) == "tar member is a symbolic link, not a file"
    assert "hard link to 'gone.jpg'" in str(got[m("lost.jpg")])
    assert {error_type(got[m(n)]) for n in ("sym.jpg", "lost.jpg")} == {ERROR_READ}
    assert read_input(m("again.jpg")) == jpeg  # as evaluate and explain read a row back


def test_a_hard_link_read_before_a_tar_breaks_keeps_its_row(jpeg, tmp_path):
    """A truncated tar: the file and the link to it read before the break are rows (the
    link's from the second pass, which breaks at the same place, after the target), then
    one error under the tar's own path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_tar_member(tar, "a.jpg", jpeg)
        info = tarfile.TarInfo("again.jpg")
        info.type, info.linkname = tarfile.LNKTYPE, "a.jpg"
        tar.addfile(info)
        add_tar_member(tar, "b.jpg", jpeg)
    shard = tmp_path / "cut.tar"
    padded = -(-len(jpeg) // 512) * 512  # a member's bytes fill whole 512-byte blocks
    shard.write_bytes(buf.getvalue()[:512 + padded + 512 + 512 + 100])  # a, the link, b's header, 100 of b's bytes
    got = list(iter_tar(str(shard)))
    m = lambda name: member_path(str(shard), name)  # noqa: E731
    assert [name for name, _ in got] == [m("a.jpg"), str(shard), m("again.jpg")]
    assert got[0][1] == got[2][1] == jpeg and error_type(got[1][1]) == ERROR_TAR


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux's /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_named_tar_members_are_read_in_one_pass_per_tar(jpeg, tmp_path):
    """review.csv and labelled manifests name tar members one by one (TAR#MEMBER), mixed
    with plain files: each tar is streamed once for all of its members named, not once
    per member; a member named twice gives two rows; a member the tar lacks and a
    member of a missing tar are FileNotFoundErrors naming them."""
    from imgcls.inference.read import iter_inputs

    tars = {}
    for t in ("a", "b"):
        tars[t] = str(tmp_path / f"{t}.tar")
        with tarfile.open(tars[t], "w") as tar:
            for i in range(30):
                add_tar_member(tar, f"{t}/{i}.jpg", jpeg + bytes([i]))
    (tmp_path / "plain.jpg").write_bytes(jpeg)
    wanted = [member_path(tars[t], f"{t}/{i}.jpg") for i in range(0, 30, 2) for t in ("a", "b")]
    lacking, lost = member_path(tars["a"], "a/nope.jpg"), member_path(str(tmp_path / "gone.tar"), "x.jpg")
    paths = wanted + [str(tmp_path / "plain.jpg"), wanted[0], lacking, lost]
    before = bytes_read()
    got = list(iter_inputs(paths))
    read = bytes_read() - before
    assert sorted(name for name, _ in got) == sorted(paths)
    found = dict(got)
    for t in ("a", "b"):
        assert found[member_path(tars[t], f"{t}/4.jpg")] == jpeg + bytes([4])
    assert [data for name, data in got if name == wanted[0]] == [jpeg + bytes([0])] * 2
    assert found[str(tmp_path / "plain.jpg")] == jpeg
    assert isinstance(found[lacking], FileNotFoundError) and str(found[lacking]) == f"a/nope.jpg is not in {tars['a']}"
    assert isinstance(found[lost], FileNotFoundError) and "gone.tar" in str(found[lost])
    # One pass each (the 'a' tar read to its end, for the member it lacks); a pass per
    # member would read them about 15 times over.
    whole = sum(os.path.getsize(t) for t in tars.values()) + len(jpeg)
    assert read < 1.5 * whole, (read, whole)
    assert read_input(member_path(tars["b"], "b/29.jpg")) == jpeg + bytes([29])


def test_read_many_keeps_order_and_returns_errors(jpeg, tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg)
    (tmp_path / "big.bin").write_bytes(b"x" * (len(jpeg) + 1))
    got = storage.read_many([str(tmp_path / "a.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path / "big.bin")],
                            max_bytes=len(jpeg))
    assert got[0] == jpeg
    assert isinstance(got[1], FileNotFoundError) and isinstance(got[2], storage.FileTooLargeError)
    assert [error_type(e) for e in got[1:]] == [ERROR_READ, ERROR_TOO_LARGE]


def test_every_error_row_has_a_type_and_a_text_that_is_the_same_in_every_run(jpeg, tmp_path):
    """One row per file, each damage its error_type; the texts hold no memory address (PIL's
    'cannot identify image file <_io.BytesIO object at 0x7f...>' did), so two reads of the
    same files give the same rows."""
    files = {"photo.png": jpeg, "zero.jpg": b"", "notes.txt": b"not an image", "truncated.png": jpeg[:len(jpeg) // 3],
             "big.png": jpeg + bytes(len(jpeg)),
             # An iPhone photo's first bytes (PIL has no HEIF reader).
             "photo.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    Image.new("L", (1100, 1000)).save(tmp_path / "bomb.png")
    (tmp_path / "folder.jpg").mkdir()
    paths = sorted(str(p) for p in tmp_path.iterdir()) + [str(tmp_path / "missing.jpg")]
    first, second = (rows(paths, max_bytes=int(len(jpeg) * 1.5), max_pixels=1_000_000) for _ in range(2))
    assert first == second and [r[0] for r in first] == paths
    kinds = {os.path.basename(p): t for p, _, _, t in first}
    assert kinds == {"photo.png": None, "zero.jpg": ERROR_EMPTY, "notes.txt": ERROR_DECODE,
                     "truncated.png": ERROR_DECODE, "big.png": ERROR_TOO_LARGE, "photo.heic": ERROR_UNSUPPORTED,
                     "bomb.png": ERROR_TOO_LARGE, "folder.jpg": ERROR_READ, "missing.jpg": ERROR_READ}
    for path, status, error, kind in first:
        assert (status == STATUS_OK) == (error is None) == (kind is None)
        assert kind is None or kind in ERROR_TYPES
        assert error is None or not re.search(r"0x[0-9a-fA-F]{6,}| at 0x", error), error
    texts = {os.path.basename(p): e for p, _, e, _ in first}
    assert texts["notes.txt"] == "ImageDecodeError: UnidentifiedImageError: cannot identify image file"


def test_cut_runs_keeps_tars_alone_and_caps_runs():
    paths = [f"{i}.jpg" for i in range(7)] + ["x.tar"] + ["y.jpg"]
    assert cut_runs(paths, 3) == [["0.jpg", "1.jpg", "2.jpg"], ["3.jpg", "4.jpg", "5.jpg"], ["x.tar"],
                                  ["6.jpg", "y.jpg"]]


def test_flat_folder_plan_is_written_once_and_reused(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(7):
        (inbox / f"{i}.jpg").write_bytes(b"x")
    (inbox / ".hidden.jpg").write_bytes(b"x")
    out = str(tmp_path / "out")
    plan = plan_inputs(str(inbox), out, files_per_shard=3)
    assert (plan.files, plan.shards, plan.reused) == (7, 3, False)
    listed = planned_paths(plan)
    assert sum(listed, []) == sorted(str(inbox / f"{i}.jpg") for i in range(7))
    (inbox / "new.jpg").write_bytes(b"x")  # appears after the first run: a rerun keeps its plan
    again = plan_inputs(str(inbox), out, files_per_shard=3)
    assert again.reused and (again.files, again.sha256) == (7, plan.sha256)
    with pytest.raises(ValueError, match="other inputs"):
        plan_inputs(str(inbox), out, files_per_shard=4)


def test_a_small_job_is_cut_into_enough_shards_for_every_cpu(tmp_path):
    """On 1 CPU: at least 4 shards (of 16 files or more)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(100):
        (inbox / f"{i:03d}.jpg").write_bytes(b"x")
    (inbox / "z.tar").write_bytes(b"x")
    plan = plan_inputs(str(inbox), str(tmp_path / "out"), files_per_shard=2000, cpus=1)
    listed = planned_paths(plan)
    assert [len(x) for x in listed] == [26, 26, 26, 22, 1]  # the tar alone
    assert sum(listed, []) == sorted(str(p) for p in inbox.iterdir())
    assert len(os.listdir(tmp_path / "out" / "_inputs" / "lists")) == 5  # the first cut's lists are gone
    few = plan_inputs(str(inbox), str(tmp_path / "few"), files_per_shard=20, cpus=1)  # already enough shards
    assert few.shards == 5 + 1


def test_parts_past_99999_and_counts_in_their_footers(tmp_path):
    out = str(tmp_path)
    table = pa.table({COL_PATH: ["a", "b", "c"], COL_STATUS: [STATUS_OK, STATUS_ERROR, STATUS_OK]})
    for shard in (7, 99_999, 100_000, 1_234_567):
        assert write_part_atomic(table, out, shard) == {"rows": 3, "ok": 2, "errors": 1}
    (tmp_path / "part-12.parquet.tmp").write_bytes(b"")  # not a part
    assert done_shards(out) == {7, 99_999, 100_000, 1_234_567}
    assert part_name(1_234_567) == "part-1234567.parquet"
    assert part_counts(out, [100_000])[0] == {"rows": 3, "ok": 2, "errors": 1}
    meta = pq.read_metadata(tmp_path / part_name(7)).metadata
    assert json.loads(meta[COUNTS_KEY])["rows"] == 3
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    assert np.array_equal(pq.read_table(tmp_path / part_name(7))[COL_PATH].to_pylist(), ["a", "b", "c"])


def test_hidden_files_and_folders_are_skipped_by_both_listings(tmp_path):
    """A notebook's .ipynb_checkpoints/ is neither labelled nor a class."""
    from imgcls.labelled import list_labelled_images
    from imgcls.inference.inputs import list_prefix

    for folder in ("cat", "dog", ".ipynb_checkpoints", "cat/.thumbs"):
        (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / folder / "a.png").write_bytes(b"x")
    (tmp_path / "data" / "dog" / ".DS_Store").write_bytes(b"x")
    images = list_labelled_images(str(tmp_path / "data"))
    assert sorted(set(images.labels)) == ["cat", "dog"] and len(images.paths) == 2
    assert list_prefix(str(tmp_path / "data")) == [str(tmp_path / "data" / c / "a.png") for c in ("cat", "dog")]
    plan = plan_inputs(str(tmp_path / "data" / "*" / "*"), str(tmp_path / "out"), files_per_shard=10)
    [listed] = planned_paths(plan)
    assert listed == [str(tmp_path / "data" / c / "a.png") for c in ("cat", "dog")]


def test_local_listings_are_sorted_in_runs_spilled_to_disk_and_planned_as_they_come(tmp_path, monkeypatch):
    """A flat folder larger than a sort run: the listing comes in sorted runs merged from
    disk, never all in memory, and its shard lists are those of the sorted paths."""
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    names = [f"{i:03d}.jpg" for i in range(40)]
    for name in reversed(names):
        (inbox / name).write_bytes(b"x")
    (inbox / "sub" / "a.jpg").write_bytes(b"x")
    monkeypatch.setattr(storage, "SORT_RUN", 7)  # 40 files: 6 runs on disk
    subdirs = []
    listed = list(storage.iter_files(str(inbox), subdirs=subdirs))
    assert listed == [(str(inbox / n), None) for n in names] and subdirs == [str(inbox / "sub")]
    plan = plan_inputs(str(inbox), str(tmp_path / "out"), files_per_shard=16, cpus=1)
    assert planned_paths(plan) == [[str(inbox / n) for n in names[:16]], [str(inbox / n) for n in names[16:32]],
                                   [str(inbox / n) for n in names[32:]], [str(inbox / "sub" / "a.jpg")]]


def test_a_flat_prefix_and_a_glob_on_s3_are_planned_page_by_page_with_their_sizes(s3_server, tmp_path,
                                                                                 monkeypatch):
    """The driver writes a flat prefix's shard lists as the listing's pages come (taken
    3 keys at a time here), in key order, each path with its size; a glob's files the same
    way, to the pattern's depth, without the folders it matches."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    files = {f"imgcls/flat/{i:02d}.jpg": b"x" * i for i in range(11)}
    files.update({"imgcls/flat/.hidden.jpg": b"h", "imgcls/flat/shard.tar": b"t" * 5, "imgcls/tree/top.jpg": b"a",
                  "imgcls/tree/sub/a.jpg": b"ab", "imgcls/tree/sub/deep/b.jpg": b"abc", "imgcls/tree/sub/.c.jpg": b"",
                  "imgcls/tree/sub.jpg/x.png": b"x"})
    fs.pipe(files)
    monkeypatch.setattr(storage, "LIST_PAGE", 3)
    plan = plan_inputs("s3://imgcls/flat", str(tmp_path / "flat"), files_per_shard=4, cpus=1)
    lists = [pq.read_table(u) for u in plan.shard_table()["list"].to_pylist()]
    flat = [f"s3://imgcls/flat/{i:02d}.jpg" for i in range(11)]
    assert [t[COL_PATH].to_pylist() for t in lists] == [flat[:4], flat[4:8], flat[8:], ["s3://imgcls/flat/shard.tar"]]
    assert sum((t["size"].to_pylist() for t in lists), []) == list(range(11)) + [5]
    kept = storage.filesystem("s3://imgcls/flat")[0].dircache  # shared by the session's other S3 tests
    assert not [k for k in kept if k.startswith("imgcls/flat")]  # no listing kept (s3fs's isdir would keep one)
    again = plan_inputs("s3://imgcls/flat", str(tmp_path / "flat"), files_per_shard=4, cpus=1)
    assert again.reused and again.sha256 == plan.sha256
    glob = plan_inputs("s3://imgcls/tree/*/*.jpg", str(tmp_path / "glob"), files_per_shard=4, cpus=1)
    assert planned_paths(glob) == [["s3://imgcls/tree/sub/a.jpg"]]  # not sub.jpg/, a folder; not .c.jpg
    assert [p for p, _ in storage.iter_files("s3://imgcls/tree", recursive=True)] == [
        f"s3://imgcls/tree/{n}" for n in ("sub.jpg/x.png", "sub/.c.jpg", "sub/a.jpg", "sub/deep/b.jpg", "top.jpg")]
    glob = plan_inputs("s3://imgcls/flat/0*", str(tmp_path / "glob0"), files_per_shard=100, cpus=1)
    assert planned_paths(glob) == [flat[:10]]


def test_reads_refuse_a_file_over_the_cap_unread_and_keep_a_budget(s3_server):
    """On the S3 server, a 64 MB object over a 16 MB cap is an error row without a byte
    read (its size asked first, as for a manifest's paths; or taken from the listing),
    and six 16 MB objects under a 16 MB budget are fetched one at a time: the reading
    process's peak memory (VmHWM, reset after warming up) grows by neither 64 MB nor
    96 MB. Before the cap came first it grew by 192 MB and 124 MB (four objects)."""
    import subprocess
    import sys

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    mb = 2**20
    fs.pipe({"imgcls/cap/small.jpg": b"x" * 1000, "imgcls/cap/big.bin": bytes(64 * mb),
             **{f"imgcls/cap/part{i}.bin": bytes([i]) * (16 * mb) for i in range(6)}})
    script = f"""
import json
from imgcls import storage
from imgcls.inference.read import iter_inputs

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key + ":"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident memory (VmHWM) starts again from here
    return status("VmRSS")

storage.read_many(["s3://imgcls/cap/small.jpg"], 1000)  # connections and clients made
rows, base = [], reset()
for name, data in iter_inputs(["s3://imgcls/cap/small.jpg", "s3://imgcls/cap/big.bin"], max_bytes={16 * mb}):
    rows.append(type(data).__name__)
capped = status("VmHWM") - base
base = reset()
for name, data in iter_inputs(["s3://imgcls/cap/part%d.bin" % i for i in range(6)], max_bytes={16 * mb},
                              budget={16 * mb}):
    rows.append(len(data))
    del data
print(json.dumps({{"rows": rows, "capped_mb": capped, "budget_mb": status("VmHWM") - base}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["rows"] == ["bytes", "FileTooLargeError"] + [16 * mb] * 6
    assert got["capped_mb"] < 16, got  # the 64 MB object was never read
    assert got["budget_mb"] < 96, got  # one 16 MB object at a time (its read's copies aside; 46 MB), not six
    [refused] = storage.read_many(["s3://imgcls/cap/big.bin"], max_bytes=16 * mb, sizes=[64 * mb])  # a listing's
    assert isinstance(refused, storage.FileTooLargeError) and error_type(refused) == ERROR_TOO_LARGE
    assert str(refused) == f"file of {64 * mb} bytes exceeds the {16 * mb}-byte limit"
