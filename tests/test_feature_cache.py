"""The feature cache: never serves a wrong row, keeps what was computed, survives an unwritable folder."""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch

import cirbench.feature_cache as fc
from cirbench.feature_cache import CacheWarning, FeatureCache, image_identity
from cirbench.types import ImageRef

KEY = {"format": 2, "backbone": {"model": "m"}, "feature": {"kind": "test"}}


@pytest.fixture
def files(tmp_path):
    refs = []
    for i in range(10):
        p = tmp_path / "img" / f"{i}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
        refs.append(ImageRef(str(i), p))
    return refs


def _content_features(todo, on_chunk=None):
    """A 'model' whose feature is a function of the file's bytes, so stale rows are detectable."""
    rows = torch.stack([torch.tensor([float(r.path.read_bytes()[0]), float(len(r.path.read_bytes()))])
                        for r in todo])
    if on_chunk is not None:
        on_chunk(torch.arange(len(todo)), rows)
    return rows


def _expected(refs):
    return _content_features(refs)


def test_rows_are_reused_and_written_as_shards(tmp_path, files):
    cache = FeatureCache(tmp_path / "c")
    first = cache.get_or_compute(KEY, files, _content_features)
    assert torch.equal(first, _expected(files)) and cache.stats == {"hits": 0, "misses": 10}
    again = FeatureCache(tmp_path / "c")
    assert torch.equal(again.get_or_compute(KEY, files, _content_features), first)
    assert again.stats == {"hits": 10, "misses": 0}
    shard = next((tmp_path / "c").rglob("shard-*.safetensors"))
    assert stat.S_IMODE(shard.stat().st_mode) == 0o666 & ~_umask()  # the user's umask, not 0600
    # what the cache serves is the caller's to change: the rows it holds in memory stay as computed
    for refs in (files, files[3:7]):  # one whole shard in order, and a selection of it
        served = again.get_or_compute(KEY, refs, _content_features)
        served.mul_(-1)
        assert torch.equal(again.get_or_compute(KEY, refs, _content_features), _expected(refs))


def test_parallel_jobs_on_one_cache_encode_a_gallery_once(tmp_path, files, capsys):
    """Jobs sharing a cache (a sweep run as a job array) that need the same features at once: one encodes, the
    others wait, then read its rows; one shard is written, not one per job."""
    import threading

    calls, start, results = [], threading.Barrier(3), []

    def slow(todo, on_chunk=None):
        calls.append(len(todo))
        time.sleep(0.5)  # the other jobs arrive while this one encodes
        return _content_features(todo, on_chunk)

    def job():
        start.wait()
        results.append(FeatureCache(tmp_path / "c").get_or_compute(KEY, files, slow))  # each job its own cache

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [10] and len(results) == 3 and all(torch.equal(r, _expected(files)) for r in results)
    assert len(list((tmp_path / "c").rglob("shard-*.safetensors"))) == 1
    assert "waiting for another process that is encoding these features" in capsys.readouterr().err
    # a later job finds every row in that one shard
    more = FeatureCache(tmp_path / "c")
    calls.clear()
    more.get_or_compute(KEY, files[:4], slow)
    assert calls == [] and more.stats == {"hits": 4, "misses": 0}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_shard_whose_payload_changed_is_recomputed(tmp_path, files):
    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, _content_features)
    shard = next((tmp_path / "c").rglob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-30] ^= 0xFF  # a flipped bit inside the feature payload: the header still parses
    shard.write_bytes(bytes(data))
    cache = FeatureCache(tmp_path / "c")
    with pytest.warns(CacheWarning, match="checksum"):
        out = cache.get_or_compute(KEY, files, _content_features)
    assert torch.equal(out, _expected(files)) and cache.stats["misses"] == 10


def test_in_place_rewrite_with_restored_mtime_is_a_miss(tmp_path, files):
    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, _content_features)
    target = files[3].path
    st = target.stat()
    time.sleep(0.01)
    target.write_bytes(bytes([200]) * st.st_size)  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back, as rsync -t or touch -d would
    cache = FeatureCache(tmp_path / "c")
    out = cache.get_or_compute(KEY, files, _content_features)
    assert cache.stats["misses"] == 1 and out[3, 0] == 200.0


def test_rename_over_is_a_miss(tmp_path, files):
    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, _content_features)
    target = files[4].path
    st = target.stat()
    replacement = target.with_name("new.bin")
    replacement.write_bytes(bytes([77]) * st.st_size)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, target)  # same path, size and mtime; another inode
    cache = FeatureCache(tmp_path / "c")
    out = cache.get_or_compute(KEY, files, _content_features)
    assert cache.stats["misses"] == 1 and out[4, 0] == 77.0


def test_content_identity_survives_moving_the_data(tmp_path, files):
    FeatureCache(tmp_path / "c", identity="content").get_or_compute(KEY, files, _content_features)
    moved = tmp_path / "moved"
    os.rename(files[0].path.parent, moved)
    refs = [ImageRef(r.id, moved / r.path.name) for r in files]
    cache = FeatureCache(tmp_path / "c", identity="content")
    assert torch.equal(cache.get_or_compute(KEY, refs, _content_features), _expected(refs))
    assert cache.stats["misses"] == 0
    assert image_identity(refs[0], "content").startswith("sha256:")


def test_rows_finished_before_a_failure_are_kept(tmp_path, files):
    def dies_half_way(todo, on_chunk):
        rows = _content_features(todo)
        on_chunk(torch.arange(5), rows[:5])
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        FeatureCache(tmp_path / "c").get_or_compute(KEY, files, dies_half_way)
    cache = FeatureCache(tmp_path / "c")
    out = cache.get_or_compute(KEY, files, _content_features)
    assert cache.stats == {"hits": 5, "misses": 5} and torch.equal(out, _expected(files))


def test_unwritable_cache_warns_and_still_computes(tmp_path, files):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        cache = FeatureCache(root)
        with pytest.warns(CacheWarning, match="cannot be written"):
            out = cache.get_or_compute(KEY, files, _content_features)
        assert torch.equal(out, _expected(files)) and cache.write_error
    finally:
        root.chmod(0o700)


def test_full_disk_warns_and_still_computes(tmp_path, files, monkeypatch):
    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fc, "atomic_write_bytes", full)
    cache = FeatureCache(tmp_path / "c")
    with pytest.warns(CacheWarning, match="No space left"):
        out = cache.get_or_compute(KEY, files, _content_features)
    assert torch.equal(out, _expected(files))


def test_many_shards_are_compacted(tmp_path, files, monkeypatch):
    monkeypatch.setattr(fc, "COMPACT_ABOVE", 3)

    def one_row_chunks(todo, on_chunk):
        rows = _content_features(todo)
        for i in range(len(todo)):
            on_chunk(torch.tensor([i]), rows[i : i + 1])
        return rows

    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, one_row_chunks)
    assert len(list((tmp_path / "c").rglob("shard-*.safetensors"))) == 10
    cache = FeatureCache(tmp_path / "c")
    assert torch.equal(cache.get_or_compute(KEY, files, _content_features), _expected(files))
    assert len(list((tmp_path / "c").rglob("shard-*.safetensors"))) == 1 and cache.stats["misses"] == 0


def test_a_changed_key_never_serves_rows(tmp_path, files):
    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, _content_features)
    other = {**KEY, "precision": "bf16"}
    cache = FeatureCache(tmp_path / "c")
    cache.get_or_compute(other, files, _content_features)
    assert cache.stats["misses"] == 10


def test_a_shard_of_another_key_moved_into_a_folder_is_never_served(tmp_path, files):
    """Each shard records its key's hash: one copied into another key's folder (files moved by hand, a bf16 run's
    rows beside the fp32 ones) holds valid rows of the same images, computed otherwise; it is dropped, not served."""
    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, _content_features)
    other = {**KEY, "precision": "bf16"}
    FeatureCache(tmp_path / "c").get_or_compute(other, files, lambda todo, on_chunk=None: _content_features(
        todo, None if on_chunk is None else (lambda pos, rows: on_chunk(pos, rows + 100))) + 100)
    mine, theirs = (next(FeatureCache(tmp_path / "c")._folder(k).glob("shard-*.safetensors")) for k in (KEY, other))
    theirs.replace(mine)  # its checksum holds: only the key it records tells it apart
    cache = FeatureCache(tmp_path / "c")
    with pytest.warns(CacheWarning, match="shard key or format does not match"):
        out = cache.get_or_compute(KEY, files, _content_features)
    assert torch.equal(out, _expected(files)) and cache.stats["misses"] == 10
    stray = mine.with_name("shard-0.safetensors")
    stray.mkdir()  # a folder under a shard's name (a stray copy): no row, and the run goes on
    cache = FeatureCache(tmp_path / "c")
    with pytest.warns(CacheWarning, match="dropping feature-cache shard shard-0.safetensors"):
        out = cache.get_or_compute(KEY, files, _content_features)
    assert torch.equal(out, _expected(files)) and cache.stats["hits"] == 10 and stray.is_dir()


def test_a_folder_whose_key_file_disagrees_is_rebuilt_not_served(tmp_path, files):
    """A folder named by the key's hash whose key.json holds another key (edited, or torn by a crash) serves no
    row: the writer warns, removes it and computes; a read-only process (a torchrun rank) computes and leaves it."""
    FeatureCache(tmp_path / "c").get_or_compute(KEY, files, _content_features)
    (key_file,) = (tmp_path / "c").rglob("key.json")
    key_file.write_text('{"format": 2, "backbone": {"model": "another"}}')
    reader = FeatureCache(tmp_path / "c", writer=False)
    assert torch.equal(reader.get_or_compute(KEY, files, _content_features), _expected(files))
    assert reader.stats["misses"] == 10 and key_file.is_file()
    cache = FeatureCache(tmp_path / "c")
    with pytest.warns(CacheWarning, match="does not match its key; rebuilding it"):
        out = cache.get_or_compute(KEY, files, _content_features)
    assert torch.equal(out, _expected(files)) and cache.stats["misses"] == 10
    again = FeatureCache(tmp_path / "c")
    assert torch.equal(again.get_or_compute(KEY, files, _content_features), out) and again.stats["hits"] == 10


def test_a_missing_image_has_an_identity_that_never_matches_a_present_one(tmp_path, files):
    for mode in ("stat", "content"):
        gone = ImageRef("x", tmp_path / "img" / "gone.bin")
        assert image_identity(gone, mode) == f"{gone.path}|missing"
        assert image_identity(files[0], mode) != f"{files[0].path}|missing"


def test_without_locks_the_cache_still_works(tmp_path, files, monkeypatch):
    """The lock only saves work: a file system without flock (some network mounts) or a lock file that cannot
    be created leaves the run unlocked, never failed."""
    import errno
    import fcntl

    from cirbench.util import making

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cache = FeatureCache(tmp_path / "c")
    assert torch.equal(cache.get_or_compute(KEY, files, _content_features), _expected(files))
    (tmp_path / "file").write_text("")
    ran = []
    with making(tmp_path / "file" / "folder"):  # its parent is a file: no lock file can be made there
        ran.append(True)
    assert ran == [True]


def test_cache_list_and_clear(tmp_path, files, monkeypatch):
    """`cirbench cache list` shows each key's backbone, preprocessing, feature kind, rows and size (a damaged
    shard is named) without importing torch; `cirbench cache clear` removes what a filter selects (a backbone,
    entries no run has read for N days, or --all), asks first unless --yes, and leaves other folders alone; a
    run that reads an entry marks it used; a run after a clear encodes again."""
    import json
    import subprocess
    import sys

    from click.testing import CliRunner

    from cirbench.cli import cli

    root = tmp_path / "c"
    keys = {name: {"format": 2, "backbone": {"model": model, "pretrained": "openai"}, "precision": "fp32",
                   "preprocess": {"kind": "targetpad", "size": 224}, "feature": {"kind": "image-global"}}
            for name, model in (("l14", "ViT-L-14"), ("b32", "ViT-B-32"))}
    for key in keys.values():
        FeatureCache(root).get_or_compute(key, files, _content_features)
    (root / "generations").mkdir()
    (root / "generations" / "paid.jsonl").write_text("an LLM's answers\n")
    folders = {name: root / "features" / fc.key_hash(key)[:24] for name, key in keys.items()}

    def cache(*args, **kwargs):
        return CliRunner().invoke(cli, ["cache", *args, "--cache-dir", str(root)], **kwargs)

    listed = json.loads(cache("list", "--json").output)
    assert {(e["backbone"], e["rows"], e["preprocess"], e["feature"]) for e in listed["features"]} == {
        ("ViT-L-14/openai", 10, "targetpad 224px", "image-global"), ("ViT-B-32/openai", 10, "targetpad 224px",
                                                                      "image-global")}
    assert listed["other_folders"] == {"generations": len("an LLM's answers\n")}
    (folders["b32"] / "shard-0000000000000000.safetensors").write_bytes(b"not a shard")
    code = ("import sys\nfrom cirbench.cli import cli\n"
            f"try:\n    cli.main(['cache', 'list', '--cache-dir', {str(root)!r}], prog_name='cirbench')\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "TORCH False" in shown.stdout and "ViT-L-14/openai" in shown.stdout, shown.stdout + shown.stderr
    assert "2 entries, 20 rows" in shown.stdout and f"unreadable key or shard (the next run that needs one " \
        f"rebuilds it): {folders['b32'].name}" in shown.stdout.replace("\n", " ")

    res = cache("clear")
    assert res.exit_code == 2 and "say what to remove" in res.output
    # a month unused: only the entry no run has read since goes; a run reading the other marked it used
    month_ago = time.time() - 40 * 86400
    for folder in folders.values():
        os.utime(folder / "key.json", (month_ago, month_ago))
    FeatureCache(root).get_or_compute(keys["l14"], files, _content_features)
    assert (folders["l14"] / "key.json").stat().st_mtime > month_ago + 39 * 86400  # marked used by the read
    ten_days_ago = time.time() - 10 * 86400  # read ten days ago: kept by a 30-day filter (days, not hours)
    os.utime(folders["l14"] / "key.json", (ten_days_ago, ten_days_ago))
    res = cache("clear", "--unused-for", "30", "--dry-run")
    assert res.exit_code == 0 and "would remove 1 entry" in res.output and folders["b32"].is_dir()
    res = cache("clear", "--unused-for", "30", input="n\n")
    assert res.exit_code == 1 and folders["b32"].is_dir()  # declined
    res = cache("clear", "--unused-for", "30", "--yes")
    assert res.exit_code == 0 and "removed 1 entry" in res.output
    assert not folders["b32"].exists() and folders["l14"].is_dir()
    res = cache("clear", "--backbone", "ViT-H*", "--yes")
    assert res.exit_code == 0 and "no entry matches" in res.output and folders["l14"].is_dir()
    import cirbench.cache_inventory as inventory

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patched:  # a folder that cannot be deleted: said, and a non-zero exit
        patched.setattr(inventory.shutil, "rmtree", denied)
        res = cache("clear", "--backbone", "ViT-L-14*", "--yes")
    assert res.exit_code == 2 and "removed 0 entries" in res.output and "1 entry could not be removed" in res.output
    assert "Permission denied" in res.output and folders["l14"].is_dir()
    res = cache("clear", "--backbone", "ViT-L-14*", "--yes")
    assert res.exit_code == 0 and not folders["l14"].exists()
    assert (root / "generations" / "paid.jsonl").is_file()
    again = FeatureCache(root)
    again.get_or_compute(keys["l14"], files, _content_features)
    assert again.stats == {"hits": 0, "misses": 10}
    res = cache("clear", "--all", "--yes")
    assert res.exit_code == 0 and "removed 1 entry" in res.output
    assert "0 entries, 0 rows" in cache("list").output
    assert "no cache there yet" in CliRunner().invoke(cli, ["cache", "list", "--cache-dir",
                                                            str(tmp_path / "none")]).output
