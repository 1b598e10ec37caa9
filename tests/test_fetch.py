"""`cirbench data fetch`: official annotation files from their pinned public sources, kept only with their
official sha256. The sources cannot be reached from the test machine: CIRBENCH_FETCH_MIRROR serves the real
files from the shared annotations folder (a mirror with the data root's layout, or one folder per dataset)."""

from __future__ import annotations

import re
import shutil

import pytest
from annotations import ANNOTATIONS, needs_annotations
from click.testing import CliRunner
from helpers import serving

from cirbench.cli import cli
from cirbench.fetch import MIRROR_ENV
from cirbench.plugins import get_registry


def _fetch(*args, mirror=None):
    env = {MIRROR_ENV: str(mirror)} if mirror is not None else {}
    return CliRunner(env=env).invoke(cli, ["data", "fetch", *args])


def test_every_source_is_pinned_and_checksummed(tmp_path):
    """A file fetched from a branch could change under the same name: every source names a commit, and every
    file has the official checksum the download is held to (read from each built dataset, as fetch reads them:
    one plugin class may serve several benchmarks)."""
    reg = get_registry()
    fetchable = []
    for name, spec in reg.datasets.items():
        dataset = spec.create(tmp_path / name, {})
        sources = getattr(dataset, "OFFICIAL_SOURCES", {}) or {}
        for relative, url in sources.items():
            assert re.search(r"/[0-9a-f]{40}/", url), (name, url)
            assert url.endswith(relative.split("/", 1)[-1] if name == "cirr" else relative), (name, relative, url)
            assert relative.rsplit("/", 1)[-1] in dataset.OFFICIAL_SHA256, (name, relative)
        if sources:
            fetchable.append(name)
    assert sorted(fetchable) == ["circo", "cirr", "dc-ltll", "dc-nico", "fashioniq", "fashioniq-pairs", "genecis"]


@needs_annotations
def test_fetch_writes_the_official_files_and_keeps_what_is_in_place(tmp_path):
    root = tmp_path / "CIRCO"
    res = _fetch("circo", "--data-root", str(root), mirror=ANNOTATIONS)
    assert res.exit_code == 0, res.output
    for split in ("val", "test"):
        assert (root / "annotations" / f"{split}.json").read_bytes() == (
            ANNOTATIONS / "circo" / "annotations" / f"{split}.json").read_bytes()
    assert res.output.count("fetched   ") == 2
    res = _fetch("circo", "--data-root", str(root), mirror=tmp_path / "nowhere")  # nothing to fetch: no source read
    assert res.exit_code == 0 and res.output.count("present   ") == 2, res.output

    # the user's edit is kept (exit 1) unless --force
    edited = root / "annotations" / "val.json"
    edited.write_text("[]")
    res = _fetch("circo", "--data-root", str(root), mirror=ANNOTATIONS)
    assert res.exit_code == 1 and "differs   " in res.output and edited.read_text() == "[]"
    res = _fetch("circo", "--data-root", str(root), "--force", mirror=ANNOTATIONS)
    assert res.exit_code == 0 and edited.read_bytes() == (ANNOTATIONS / "circo" / "annotations" / "val.json"
                                                         ).read_bytes()

    # CIRR's files go where its loader reads them (cirr/ under the root), FashionIQ's all twelve
    res = _fetch("cirr", "--data-root", str(tmp_path / "CIRR"), mirror=ANNOTATIONS)
    assert res.exit_code == 0 and len(list((tmp_path / "CIRR" / "cirr").rglob("*.json"))) == 4, res.output
    (val,) = get_registry().dataset("cirr").create(tmp_path / "CIRR", {}).load("val")
    assert len(val.queries) == 4181
    res = _fetch("fashioniq", "--data-root", str(tmp_path / "FIQ"), mirror=ANNOTATIONS)
    assert res.exit_code == 0 and len(list((tmp_path / "FIQ").rglob("*.json"))) == 12, res.output


@needs_annotations
def test_fetch_from_an_http_mirror_of_the_annotations(tmp_path):
    """A mirror given as a URL (a lab's web server) is read as the folder mirror is: the data root's layout or one
    folder per dataset under it, each file held to its official checksum."""
    with serving(ANNOTATIONS) as mirror:
        res = _fetch("circo", "--data-root", str(tmp_path / "CIRCO"), mirror=mirror)
        assert res.exit_code == 0 and res.output.count("fetched   ") == 2, res.output
        assert (tmp_path / "CIRCO" / "annotations" / "val.json").read_bytes() == (
            ANNOTATIONS / "circo" / "annotations" / "val.json").read_bytes()
        res = _fetch("circo", "--data-root", str(tmp_path / "other"), mirror=mirror + "/nowhere/")
        assert res.exit_code == 2 and "HTTP Error 404" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "other" / "annotations" / "val.json").exists()


@needs_annotations
def test_a_file_that_cannot_be_had_or_is_not_official_writes_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(ANNOTATIONS / "circo", mirror / "circo")
    (mirror / "circo" / "annotations" / "test.json").write_text("[]")  # a mirror serving another file
    root = tmp_path / "CIRCO"
    res = _fetch("circo", "--data-root", str(root), mirror=mirror)
    assert res.exit_code == 2 and "is not the official test.json" in res.output and "nothing was written" in res.output
    assert not (root / "annotations" / "test.json").exists()
    assert [p.name for p in (root / "annotations").iterdir()] == ["val.json"]  # no partial file left behind
    res = _fetch("circo", "--data-root", str(tmp_path / "other"), mirror=tmp_path / "empty")
    assert res.exit_code == 2 and "cannot fetch annotations/val.json" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = _fetch("shapes")
    assert res.exit_code == 2 and "cirbench data prepare shapes" in res.output


@pytest.mark.parametrize("name", ["imagenet-r", "patterncom"])
def test_datasets_without_sources_say_where_their_files_come_from(name):
    res = _fetch(name, "--data-root", "/nonexistent")
    assert res.exit_code == 2 and "datasets/README.md" in res.output, res.output
