"""Hub files pinned to the commit they were published at and to their sha256: taken from the local Hugging Face
cache (at that commit, or a copy of the repository's head whose hash says it is the same file), downloaded at
that commit otherwise, and refused, in one line, when they are not the published file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cirbench import hub
from cirbench.errors import CheckpointError
from cirbench.hub import HubFile, availability, hub_file

REPO = "someone/released-weights"
PINNED = "1" * 40  # the commit the file was published at
HEAD = "2" * 40  # the repository's head when a user downloaded it without a revision
PUBLISHED = b"the published weights"
SHA256 = hashlib.sha256(PUBLISHED).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, and no network: ``put`` adds a file at a commit (``main`` names ``HEAD``)."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    repo = root / f"models--{REPO.replace('/', '--')}"

    def put(commit: str, content: bytes, name: str = "phi.pt") -> Path:
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(HEAD)
        return path

    return put


def fetch(**pin):
    return hub_file(REPO, "phi.pt", "the released weights", **pin)


def test_the_file_at_its_commit_or_the_same_file_at_head_comes_from_the_cache(cache):
    head_copy = cache(HEAD, PUBLISHED)
    assert fetch(revision=PINNED, sha256=SHA256) == head_copy  # same bytes: not fetched again
    assert fetch() == head_copy  # unpinned: the head
    pinned_copy = cache(PINNED, PUBLISHED)
    assert fetch(revision=PINNED, sha256=SHA256) == pinned_copy
    assert availability(HubFile(REPO, "phi.pt", PINNED).source) == ("in the Hugging Face cache", True)


def test_a_head_that_moved_on_is_not_taken_for_the_published_file(cache):
    cache(HEAD, b"weights pushed later")
    with pytest.raises(CheckpointError, match=rf"cannot get the released weights \(https://huggingface.co/{REPO}/blob/"
                                              rf"{PINNED}/phi.pt\): ConnectionError.*pass --checkpoint PATH"):
        fetch(revision=PINNED, sha256=SHA256)
    assert availability(HubFile(REPO, "phi.pt", PINNED).source) == ("NOT AVAILABLE: no network", False)
    assert availability(HubFile(REPO, "phi.pt").source) == ("in the Hugging Face cache", True)


def test_a_cached_file_that_is_not_the_published_one_is_refused_in_one_line(cache):
    path = cache(PINNED, b"truncated")
    with pytest.raises(CheckpointError) as info:
        fetch(revision=PINNED, sha256=SHA256)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"blob/{PINNED}/phi.pt" in message
    assert "sha256 differs" in message and "delete it to download it again, or pass --checkpoint PATH" in message


@pytest.mark.parametrize("content, ok", [(PUBLISHED, True), (b"something else", False)])
def test_a_download_is_made_at_the_pinned_commit_and_checked(cache, monkeypatch, tmp_path, content, ok):
    import huggingface_hub

    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(cache(revision or HEAD, content))

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    if ok:
        assert fetch(revision=PINNED, sha256=SHA256).read_bytes() == PUBLISHED
    else:
        with pytest.raises(CheckpointError, match="is not the released weights published at .*sha256 differs"):
            fetch(revision=PINNED, sha256=SHA256)
    assert asked == [(REPO, "phi.pt", PINNED)]


def test_sources_name_the_commit_and_read_back():
    pinned = HubFile(REPO, "phi.pt", PINNED, SHA256)
    assert pinned.source == f"hf-hub:{REPO}@{PINNED}/phi.pt"
    assert HubFile.parse(pinned.source) == HubFile(REPO, "phi.pt", PINNED)
    assert HubFile.parse(f"hf-hub:{REPO}/phi.pt") == HubFile(REPO, "phi.pt")
    assert HubFile(REPO, "phi.pt").url == f"https://huggingface.co/{REPO}/blob/main/phi.pt"


def test_the_built_in_pins_are_whole_commits_and_hashes():
    """Every default a method or backbone fetches from the hub with a known publication names a full commit id and
    a sha256 (an abbreviated commit is not a revision the hub resolves for a download)."""
    from cirbench.backbones import REMOTECLIP, REMOTECLIP_REVISION
    from cirbench.methods._shared.textinv import LINCIR_DEMO
    from cirbench.methods.compodiff.model import RELEASED

    hexdigits = set("0123456789abcdef")
    pins = [LINCIR_DEMO[0], RELEASED, *(HubFile(REMOTECLIP[1], REMOTECLIP[2].format(model=m), REMOTECLIP_REVISION,
                                                sha) for m, sha in REMOTECLIP[3].items())]
    for pin in pins:
        assert pin.revision and len(pin.revision) == 40 and set(pin.revision) <= hexdigits, pin
        assert pin.sha256 and len(pin.sha256) == 64 and set(pin.sha256) <= hexdigits, pin


def test_a_transformers_clip_at_a_revision_is_fetched_there(monkeypatch):
    from cirbench import hf_clip

    asked = []
    monkeypatch.setattr(hub, "hub_file", lambda repo, name, what, option, revision=None: asked.append(
        (repo, name, revision)) or Path(name))
    assert hf_clip.files_of("hf:BAAI/BGE-VL-base@v1.0") == (Path("config.json"), Path("model.safetensors"))
    assert asked == [("BAAI/BGE-VL-base", "config.json", "v1.0"), ("BAAI/BGE-VL-base", "model.safetensors", "v1.0")]
    for bad in ("hf:BAAI/BGE-VL-base@", "hf:BAAI", "hf:a/b/c"):
        with pytest.raises(CheckpointError, match="neither a folder nor a Hugging Face hub repository id"):
            hf_clip.files_of(bad)


def test_transformers_models_are_loaded_at_the_revision_their_name_gives(tmp_path, monkeypatch):
    """``OWNER/NAME@REVISION`` (a captioner, a language model, CompoDiff's text encoder) is the hub id at that
    revision; a local folder is itself, even with an @ in its name, and never looks at the hub."""
    from cirbench.generation.hf import from_pretrained_args
    from cirbench.hub import pretrained_source

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert pretrained_source("Salesforce/blip2-opt-2.7b@51572668") == (
        "Salesforce/blip2-opt-2.7b", {"local_files_only": False, "revision": "51572668"})
    assert pretrained_source("Salesforce/blip2-opt-2.7b") == ("Salesforce/blip2-opt-2.7b", {"local_files_only": False})
    folder = tmp_path / "model@v2"
    folder.mkdir()
    assert pretrained_source(str(folder)) == (str(folder), {"local_files_only": True})
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    name, where, load = from_pretrained_args("someone/llm@main", "bf16")
    assert (name, where) == ("someone/llm", {"local_files_only": True, "revision": "main"})
    assert {k: v for k, v in load.items() if k not in where} in ({"dtype": torch.bfloat16},
                                                                   {"torch_dtype": torch.bfloat16})


# -- cirbench run --download-only -----------------------------------------------------------------------------
def _fetching_plugin():
    """A method that declares one file of every kind, and a second one that shares one of them."""
    from cirbench import Method, MethodSpec, OptionSpec, hookimpl

    sources = [("its weights", f"hf-hub:{REPO}@{PINNED}/phi.pt"), ("a word list", "https://example.org/words.csv"),
               ("its captioner", "hf-model:someone/captioner@v1"), ("its LLM", "openai-endpoint:http://localhost:1/v1")]

    def downloads(options, model, pretrained):
        if options["scale"] > 2:
            raise CheckpointError("no released weights at this scale: pass --checkpoint")
        return sources[: 4 if options["scale"] == 1 else 1]

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            for name in ("fetching", "fetching-too"):
                register(MethodSpec(name=name, description="declares downloads", factory=Method, downloads=downloads,
                                    options=(OptionSpec("scale", "a sweepable number", "float", 1.0,
                                                        sweepable=True),)))

    return Plugin()


def test_download_only_fetches_each_thing_once_and_reads_no_benchmark(tmp_path, monkeypatch, tiny_config):
    from click.testing import CliRunner

    from cirbench.cli import cli
    from cirbench.plugins import get_registry, reset_registry

    fetched = []
    monkeypatch.setattr(hub, "hub_file", lambda repo, name, what, option="checkpoint", **pin: fetched.append(
        ("hub", repo, name, pin["revision"])) or tmp_path / name)
    monkeypatch.setattr(hub, "url_file", lambda url, what, option: fetched.append(("url", url)) or tmp_path / "w")
    monkeypatch.setattr(hub, "_download_model", lambda name, what: fetched.append(("model", name)) or tmp_path)
    get_registry().register_plugin(_fetching_plugin(), name="fetching-plugin")
    try:
        res = CliRunner().invoke(cli, ["run", "--method", "fetching,fetching-too", "--scale", "1,2", "--dataset",
                                       "circo", "--data-root", str(tmp_path / "no-such-folder"), "--backbone",
                                       str(tiny_config), "--pretrained", "none", "--download-only"])
        assert res.exit_code == 0, res.output
        assert fetched == [("hub", REPO, "phi.pt", PINNED), ("url", "https://example.org/words.csv"),
                           ("model", "someone/captioner@v1")]
        assert "random initialisation" in res.output and "an endpoint: nothing to download" in res.output
        assert "the 5 things the run needs are here" in res.output
        assert not (tmp_path / "results").exists()

        fetched.clear()  # one that cannot be fetched: the others still are, then one line and exit 2
        monkeypatch.setattr(hub, "url_file", lambda url, what, option: (_ for _ in ()).throw(
            CheckpointError(f"cannot download {what} ({url}): no network")))
        res = CliRunner().invoke(cli, ["run", "--method", "fetching", "--scale", "1,3", "--backbone", str(tiny_config),
                                       "--pretrained", "none", "--download-only"])
        assert res.exit_code == 2, res.output
        assert "NOT FETCHED: cannot download a word list (https://example.org/words.csv): no network" in res.output
        assert "NOT FETCHED: no released weights at this scale" in res.output
        assert res.output.strip().splitlines()[-1] == "error: 2 of the 6 things the run needs not fetched (above)"
        assert ("model", "someone/captioner@v1") in fetched and "Traceback" not in res.output
        res = CliRunner().invoke(cli, ["run", "--method", "fetching", "--download-only", "--dry-run"])
        assert res.exit_code == 2 and "give one of them" in res.output
    finally:
        reset_registry()


@pytest.mark.parametrize("files, weights", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "tokenizer.json"], ["model.safetensors"]),
    (["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
      "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin"],
     ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
    (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "pytorch_model.bin", "open_clip_model.safetensors", "model.fp16.safetensors"],
     ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
])
def test_a_transformers_model_is_fetched_with_one_format_of_weights(monkeypatch, files, weights):
    """What ``from_pretrained`` reads (configs, tokenizer files, remote code) and the weights in the format it
    prefers, at the revision named; not TensorFlow's or open_clip's copies of the weights."""
    import fnmatch

    import huggingface_hub

    asked = []

    def snapshot(repo, revision=None, allow_patterns=()):
        asked.append((repo, revision, [f for f in files if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]))
        return "/hub/snapshot"

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert hub._download_model("someone/model@abc", "a model") == Path("/hub/snapshot")
    ((repo, revision, chosen),) = asked
    assert (repo, revision) == ("someone/model", "abc")
    assert [f for f in chosen if not f.endswith(".json")] == weights and "config.json" in chosen
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(CheckpointError, match=r"cannot get a model \(https://huggingface.co/someone/model/tree/abc\)"):
        hub._download_model("someone/model@abc", "a model")


def test_backbone_weights_are_fetched_without_building_the_model(monkeypatch, tmp_path, tiny_config):
    """An open_clip tag's file through open_clip's own download, RemoteCLIP's at its pinned commit; offline, one
    line; random, bundled and file weights need nothing."""
    import open_clip

    from cirbench import backbones
    from cirbench.backbones import download_weights
    from cirbench.errors import CirbenchError

    asked = []
    monkeypatch.setattr(backbones, "_weights_cached", lambda cfg, cache_dir: False)
    monkeypatch.setattr(backbones, "_weights_reachable", lambda: True)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, cache_dir=None: asked.append(cfg) or "/w.bin")
    assert download_weights("ViT-B-32", "openai") == "/w.bin"
    assert asked == [open_clip.get_pretrained_cfg("ViT-B-32", "openai")]
    monkeypatch.setattr(hub, "hub_file", lambda repo, name, what, option, **pin: tmp_path / f"{name}@{pin['revision']}")
    fetched = download_weights("ViT-L-14", "remoteclip")
    assert fetched.endswith(f"RemoteCLIP-ViT-L-14.pt@{backbones.REMOTECLIP_REVISION}")
    assert download_weights(str(tiny_config), "none") == "random initialisation"
    with pytest.raises(CheckpointError, match="weights file .*absent.safetensors does not exist"):
        download_weights(str(tiny_config), str(tmp_path / "absent.safetensors"))  # not reported as there
    (tmp_path / "here.safetensors").write_bytes(b"")
    assert download_weights(str(tiny_config), str(tmp_path / "here.safetensors")) == f"file {tmp_path}/here.safetensors"
    monkeypatch.setattr(backbones, "_weights_reachable", lambda: False)
    with pytest.raises(CirbenchError, match="cannot download pretrained weights 'openai' for ViT-B-32 .*no network"):
        download_weights("ViT-B-32", "openai")


def test_train_download_only_fetches_the_backbone_and_what_the_trainer_needs(tmp_path, monkeypatch, tiny_config):
    """SEARLE's training fetches the concept and phrase files, RTD's the frozen LinCIR Phi unless --phi names one;
    the corpus is not read (it need not exist yet) and nothing is written."""
    from click.testing import CliRunner

    from cirbench.cli import cli

    fetched = []
    monkeypatch.setattr(hub, "url_file", lambda url, what, option: fetched.append(url) or tmp_path / "file")
    common = ["--corpus", str(tmp_path / "not-yet"), "--output", str(tmp_path / "run"), "--backbone",
              str(tiny_config), "--pretrained", "none", "--download-only"]
    res = CliRunner().invoke(cli, ["train", "--method", "searle", *common])
    assert res.exit_code == 0, res.output
    assert len(fetched) == 2 and all(url.startswith("https://") for url in fetched)
    assert "random initialisation" in res.output and "the 3 things the training needs are here" in res.output
    res = CliRunner().invoke(cli, ["train", "--method", "rtd", *common])  # LinCIR's demo Phi is for ViT-L-14 only
    assert res.exit_code == 2 and "NOT FETCHED: LinCIR's demo weights are for ViT-L-14/openai" in res.output
    assert "pass --phi" in res.output and "1 of the 2 things the training needs not fetched" in res.output
    res = CliRunner().invoke(cli, ["train", "--method", "rtd", *common, "--phi", str(tmp_path / "phi.pt")])
    assert res.exit_code == 0 and "the one thing the training needs is here" in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_a_plain_download_names_no_option_to_pass(cache, monkeypatch, tmp_path):
    """What ``--download-only`` fetches is not an option's file: its errors say what failed, not a made-up flag;
    where an option takes the file, the error names it."""
    from cirbench.hub import download

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "_url_reachable", lambda url: False)
    for source in ("https://example.org/words.csv", f"hf-hub:{REPO}@{PINNED}/phi.pt"):
        with pytest.raises(CheckpointError) as info:
            download(source, "a word list")
        assert "pass --" not in str(info.value) and str(info.value).endswith("on a connected machine")
    with pytest.raises(CheckpointError, match=r"on a connected machine and pass --vocabulary PATH$"):
        hub.url_file("https://example.org/words.csv", "a word list", "vocabulary")


def test_a_published_urls_availability_reads_torchs_hub_cache_then_the_host(monkeypatch, tmp_path):
    """A file published at a URL (what --dry-run says of it): in torch's hub cache under its name, else to
    download when its host answers (on the URL's port), else not available; an OpenAI endpoint without a key is
    refused before any host is asked."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    asked = []
    monkeypatch.setattr(hub, "host_reachable", lambda host, port=443: asked.append((host, port)) or host == "up.org")
    assert availability("https://down.org/releases/v1/phi.pt") == ("NOT AVAILABLE: no network", False)
    assert availability("http://up.org:8080/phi.pt") == ("to download", True)
    assert asked == [("down.org", 443), ("up.org", 8080)]
    cached = tmp_path / "torch-hub" / "checkpoints" / "phi.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert availability("https://down.org/releases/v1/phi.pt") == ("in the torch hub cache", True)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert availability("openai-endpoint:https://api.openai.com/v1") == ("NOT AVAILABLE: $OPENAI_API_KEY is not set",
                                                                         False)
    assert availability("openai-endpoint:http://up.org:8080/v1") == ("its host answers", True)
    assert availability("openai-endpoint:https://down.org/v1") == ("NOT AVAILABLE: its host does not answer", False)
