"""KEDs: the port against a transcription of the official code, its files, errors, and a run through the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.types import Query

K = 4  # neighbours in these tests (the official 16 needs a bigger database than a test wants)


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


def random_stream_state(backbone, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """The official checkpoint's three state dicts (``img2text``, ``retrieval_fuse``, ``text_condition``) with
    random values large enough that every part moves the query."""
    from cirbench.methods._shared.textinv import token_width
    from cirbench.methods.keds.model import KnowledgeStream

    gen = torch.Generator().manual_seed(seed)
    own = KnowledgeStream(backbone.embed_dim, token_width(backbone)).state_dict()
    parts: dict[str, dict[str, torch.Tensor]] = {"img2text": {}, "retrieval_fuse": {}, "text_condition": {}}
    for name, value in own.items():
        part, _, rest = name.partition(".")
        parts[part][rest] = torch.randn(value.shape, generator=gen) * (0.3 if value.ndim > 1 else 0.5)
    return parts


def save_stream(path, parts, prefix: str = "module.") -> None:
    torch.save({**{f"state_dict_{part}": {prefix + k: v for k, v in state.items()} for part, state in parts.items()},
                "state_dict": {}, "epoch": 30}, path)


def database(seed: int, rows: int = 40, dim: int = 32, unit: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(rows, dim, generator=gen) * 2.5
    return F.normalize(feats, dim=-1) if unit else feats


# -- the official code, transcribed (src/model/model.py, src/eval_utils.py) -------------------------------------
def official_im2text(w, x):
    """IM2TEXT.forward (eval: dropout off)."""
    depth = len({k.split(".")[1] for k in w if k.startswith("layers.")})
    for i in range(depth):
        x = F.relu(F.linear(x, w[f"layers.{i}.0.weight"], w[f"layers.{i}.0.bias"]))
    return F.linear(x, w["fc_out.weight"], w["fc_out.bias"])


def official_cross_attention(w, p, q, k, v, heads=8, dim_head=64):
    """CrossAttention.forward: rearrange 'b n (h d) -> b h n d', einsum, softmax, back, to_out."""
    def split(t):
        b, n, _ = t.shape
        return t.reshape(b, n, heads, -1).permute(0, 2, 1, 3)

    q = split(F.linear(q, w[f"{p}to_q.weight"], w[f"{p}to_q.bias"]))
    k = split(F.linear(k, w[f"{p}to_k.weight"], w[f"{p}to_k.bias"]))
    v = split(F.linear(v, w[f"{p}to_v.weight"], w[f"{p}to_v.bias"]))
    dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * dim_head ** -0.5
    out = torch.einsum("b h i j, b h j d -> b h i d", dots.softmax(dim=-1), v)
    out = out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)
    return F.linear(out, w[f"{p}to_out.0.weight"], w[f"{p}to_out.0.bias"])


def official_cross_former(w, q, k, v):
    for i in range(3):
        q = official_cross_attention(w, f"cross_layers.{i}.", q, k, v)
    return q


def official_retrieved_features(feature, image_base, text_base, topk):
    """get_retrieved_features (faiss IndexFlatL2 on the stored rows, the query normalised), with the official
    shuffle of the retrieved images."""
    feature = feature / feature.norm(dim=1, keepdim=True)

    def search(base):
        distances = ((feature[:, None, :] - base[None, :, :]) ** 2).sum(dim=-1)
        return distances.topk(topk, dim=1, largest=False).indices

    topk_image = image_base[search(image_base).reshape(-1)].reshape(len(feature), topk, -1)
    topk_image = topk_image[:, torch.randperm(topk)]
    topk_text = text_base[search(text_base).reshape(-1)].reshape(len(feature), topk, -1)
    return topk_image, topk_text


def official_encode_text_img_retrieval(model, text, img_tokens, split_ind):
    """encode_text_img_retrieval, three tokens: the first row's '*' replaced, the text cut by two, EOT + 2."""
    x = model.token_embedding(text)
    collect_ind = (text == text.max()).nonzero()[:, 1]
    ind_insert = (text[0] == split_ind).nonzero()[0]
    x = torch.cat([x[:, :ind_insert], img_tokens, x[:, ind_insert + 1:-2]], dim=1)
    x = x + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(x.size(0)), collect_ind + 2] @ model.text_projection


def official_query(model, streams, query_raw, image_base, text_base, text, split_ind, weight):
    """evaluate_cirr's mixture of the image stream's ``composed_feature`` and the text stream's."""
    topk_image, topk_text = official_retrieved_features(query_raw, image_base, text_base, K)
    feats = []
    for w in streams:
        mapped = official_im2text(w["img2text"], query_raw)
        fused = official_cross_former(w["retrieval_fuse"], mapped.unsqueeze(1),
                                      *[official_im2text(w["img2text"], topk_image)] * 2)
        conditioned = official_cross_former(w["text_condition"], mapped.unsqueeze(1),
                                            *[official_im2text(w["img2text"], topk_text)] * 2)
        tokens = torch.cat([fused, conditioned, mapped.unsqueeze(1)], dim=1)
        composed = official_encode_text_img_retrieval(model, text, tokens, split_ind)
        feats.append(composed / composed.norm(dim=-1, keepdim=True))
    mixture = weight * feats[1] + (1 - weight) * feats[0]
    return mixture / mixture.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def released(tmp_path_factory, backbone):
    """Files in the released layout: two streams, a database whose image rows are not unit vectors (searched by
    L2 as stored) and whose caption rows are, one saved as a torch tensor and one as .npy."""
    root = tmp_path_factory.mktemp("keds")
    streams = (random_stream_state(backbone, 1), random_stream_state(backbone, 2))
    save_stream(root / "image_stream.pt", streams[0])
    save_stream(root / "text_stream.pt", streams[1], prefix="")
    images, captions = database(3), database(4, unit=True)
    torch.save(images, root / "cc_image_databases.pt")
    np.save(root / "cc_text_databases.npy", captions.numpy())
    options = {"image_stream": root / "image_stream.pt", "text_stream": root / "text_stream.pt",
               "image_database": root / "cc_image_databases.pt", "text_database": root / "cc_text_databases.npy",
               "neighbours": K}
    return SimpleNamespace(root=root, streams=streams, images=images, captions=captions, options=options)


def test_compose_is_the_official_evaluation(backbone, released):
    """The port, loading the official layouts, gives evaluate_cirr's mixture on CIRR- and FashionIQ-shaped queries
    and on a benchmark's own prompt (ImageNet-R's "a {domain} of *"), at the official weight and another."""
    from cirbench.methods._shared.textinv import placeholder_id, raw_image_features
    from cirbench.methods.keds.model import KEDs

    gen = torch.Generator().manual_seed(5)
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    raw = raw_image_features(backbone, pixels)
    model = backbone.model.eval()
    cases = [
        ([Query("0", "r", ("has two dogs on the grass",)), Query("1", "r", ("is at night",)),
          Query("2", "r", ("shows the same cat, sleeping",))],
         ["a photo of * , has two dogs on the grass", "a photo of * , is at night",
          "a photo of * , shows the same cat, sleeping"]),
        ([Query("0", "r", ("is longer", "has stripes")), Query("1", "r", ("is red", "no sleeves")),
          Query("2", "r", ("darker", "more casual"))],
         ["a photo of * , has stripes and is longer", "a photo of * , no sleeves and is red",
          "a photo of * , more casual and darker"]),
        ([Query(str(i), "r", ("a sketch of ",), prompt="a sketch of *") for i in range(3)], ["a sketch of *"] * 3),
    ]
    star = placeholder_id(backbone, "*")
    for weight in (0.5, 0.8):
        method = KEDs(backbone, {**released.options, "text_stream_weight": weight}, "cirr")
        refs = method.prepare_references(["a", "b", "c"], raw)
        assert refs.shape == (3, 1 + 2 * K, 32)
        for queries, texts in cases:
            ours = method.compose(refs, queries)
            text = backbone.tokenizer(texts)
            with torch.no_grad():
                expected = official_query(model, released.streams, raw, released.images, released.captions, text,
                                          star, weight)
            torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    # the knowledge counts: another database changes the query, and each stream's weight moves it
    other = dict(released.options, image_database=released.root / "shifted.pt")
    torch.save(released.images.flip(0) + 1.0, other["image_database"])
    moved = KEDs(backbone, other, "cirr")
    assert not torch.allclose(moved.compose(moved.prepare_references(["a", "b", "c"], raw), cases[0][0]),
                              KEDs(backbone, released.options, "cirr").compose(refs, cases[0][0]), atol=1e-4)


def test_the_database_search_is_l2_as_stored(released):
    """Database.nearest finds the rows the official IndexFlatL2 finds: by L2 from the normalised query, over rows
    of any length (the image rows here) and unit rows (the captions), in one search each."""
    from cirbench.methods.keds.model import Database

    db = Database(released.images, released.captions, torch.device("cpu"))
    assert [m.shape[1] for m in db.matrices] == [33, 32]  # only the non-unit rows carry their squared norm
    queries = torch.randn(6, 32, generator=torch.Generator().manual_seed(9)) * 4
    images, captions = db.nearest(queries, 5)
    q = F.normalize(queries, dim=-1)
    for found, base in ((images, released.images), (captions, released.captions)):
        nearest = torch.cdist(q, base).topk(5, dim=1, largest=False).indices
        torch.testing.assert_close(found, base[nearest])
    # a query's nearest is not its most similar by inner product when the rows' lengths differ
    ip = (q @ released.images.T).topk(5, dim=1).indices
    assert not torch.equal(ip, torch.cdist(q, released.images).topk(5, dim=1, largest=False).indices)


def test_wrong_files_say_what_is_wrong(tmp_path, backbone, released):
    from cirbench.methods.keds.model import KEDs

    def refused(match, **changes):
        with pytest.raises(CheckpointError, match=match):
            KEDs(backbone, {**released.options, **changes}, "cirr")

    torch.save({"state_dict_img2text": released.streams[0]["img2text"]}, tmp_path / "pic2word.pt")
    refused("Pic2Word checkpoint", image_stream=tmp_path / "pic2word.pt")
    state = {f"state_dict_{part}": dict(s) for part, s in released.streams[0].items()}
    del state["state_dict_text_condition"]
    torch.save(state, tmp_path / "half.pt")
    refused("no 'state_dict_text_condition' entry", image_stream=tmp_path / "half.pt")
    wide = {p: dict(s) for p, s in released.streams[0].items()}
    wide["img2text"]["layers.0.0.weight"] = torch.zeros(512, 64)
    save_stream(tmp_path / "wide.pt", wide)
    refused("does not fit this backbone.*layers.0.0.weight", text_stream=tmp_path / "wide.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    refused("junk.pt", text_stream=tmp_path / "junk.pt")
    refused("is not a file", image_stream=tmp_path / "missing.pt")
    np.save(tmp_path / "stream.npy", np.zeros((40, 32), dtype=np.float32))  # a database passed for a stream
    refused(r"is not a \.pt/\.pth checkpoint \(the released image_stream.pt", image_stream=tmp_path / "stream.npy")
    torch.save(torch.zeros(10, 48), tmp_path / "db48.pt")
    refused(r"\(10, 48\), not a \[rows, 32\] matrix", image_database=tmp_path / "db48.pt")
    torch.save(torch.zeros(12, 32), tmp_path / "db12.pt")
    refused("differ in rows", text_database=tmp_path / "db12.pt")
    nan = torch.zeros(40, 32)
    nan[3, 3] = float("nan")
    np.save(tmp_path / "nan.npy", nan.numpy())
    refused("non-finite", text_database=tmp_path / "nan.npy")
    torch.save({"a": torch.zeros(40, 32)}, tmp_path / "dict.pt")
    refused("not a \\[rows, 32\\] matrix", image_database=tmp_path / "dict.pt")
    with pytest.raises(CirbenchError, match="--neighbours 41 exceeds the database's 40 rows"):
        KEDs(backbone, {**released.options, "neighbours": 41}, "cirr").prepare_references(["a"], torch.ones(1, 32))


def test_a_stream_of_other_depths_loads_with_the_depths_its_file_has(tmp_path, backbone, released):
    """A stream trained with a 3-layer mapping and 1-layer fusions (the official IM2TEXT's n_layer and CrossFormer's
    num_layers are arguments) is built as its tensors say and recorded so."""
    from cirbench.methods._shared.textinv import token_width
    from cirbench.methods.keds.model import KnowledgeStream, load_stream

    gen = torch.Generator().manual_seed(9)
    own = KnowledgeStream(backbone.embed_dim, token_width(backbone), middle_dim=48, n_layer=3,
                          fuse_layers=1).state_dict()
    parts: dict[str, dict[str, torch.Tensor]] = {"img2text": {}, "retrieval_fuse": {}, "text_condition": {}}
    for name, value in own.items():
        part, _, rest = name.partition(".")
        parts[part][rest] = torch.randn(value.shape, generator=gen) * 0.3
    save_stream(tmp_path / "deep.pt", parts)
    stream, arch = load_stream(tmp_path / "deep.pt", backbone)
    assert arch == {"middle_dim": 48, "n_layer": 3, "fuse_layers": 1}
    raw, rows = torch.randn(2, 32, generator=gen), torch.randn(2, K, 32, generator=gen)
    mapped = official_im2text(parts["img2text"], raw)
    fused = official_cross_attention(parts["retrieval_fuse"], "cross_layers.0.", mapped.unsqueeze(1),
                                     *[official_im2text(parts["img2text"], rows)] * 2)
    with torch.no_grad():
        torch.testing.assert_close(stream(raw, rows, rows)[:, 0:1], fused, atol=2e-5, rtol=1e-4)


def test_a_database_reads_alike_from_npy_safetensors_and_torch_files(tmp_path, backbone, released):
    """The caption/image databases in any of the three formats give the same matrix (float32); a safetensors file
    of several tensors, a truncated .npy and a missing file are one-line errors naming the file."""
    from safetensors.torch import save_file

    from cirbench.methods.keds.model import KEDs, read_features

    matrix = released.images.to(torch.float16)
    np.save(tmp_path / "db.npy", matrix.numpy())
    save_file({"features": matrix}, str(tmp_path / "db.safetensors"))
    torch.save(matrix, tmp_path / "db.pt")
    read = [read_features(tmp_path / name, "image database", 32) for name in ("db.npy", "db.safetensors", "db.pt")]
    for value in read:
        assert value.dtype == torch.float32 and torch.equal(value, matrix.float())
    save_file({"a": matrix, "b": matrix.clone()}, str(tmp_path / "two.safetensors"))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "db.npy").read_bytes()[:100])
    for name, said in (("two.safetensors", "holds 2 tensors; one \\[rows, 32\\] matrix needed"),
                       ("cut.npy", "could not be read: ValueError"), ("none.npy", "is not a file")):
        with pytest.raises(CheckpointError, match=f"image features {tmp_path / name} {said}"):
            KEDs(backbone, {**released.options, "image_database": tmp_path / name}, "cirr")


def test_released_files_are_for_vit_l14_openai_and_fail_offline_in_one_line(monkeypatch, tmp_path):
    """Defaults are the hub's released files for ViT-L-14/openai (what --dry-run lists); another backbone must name
    its files; offline and not cached, each default is one line saying which option supplies it."""
    from cirbench.methods.keds.model import downloads, resolve_files

    listed = downloads({}, "ViT-L-14", "openai")
    assert [source for _, source in listed] == [f"hf-hub:LionheartzzZ/KEDs/{name}" for name in (
        "image_stream.pt", "text_stream.pt", "cc_image_databases.pt", "cc_text_databases.pt")]
    assert downloads({"image_stream": "a.pt", "text_stream": "b.pt"}, "ViT-L-14", "openai") == listed[2:]
    with pytest.raises(CheckpointError, match="released for ViT-L-14/openai only; for ViT-B-32/openai pass "
                                              "--image-stream FILE"):
        downloads({}, "ViT-B-32", "openai")
    other = SimpleNamespace(model_name="ViT-B-32", pretrained="openai")
    with pytest.raises(CheckpointError, match="released for ViT-L-14/openai only; for ViT-B-32/openai pass "
                                              "--image-database FILE"):  # before any download is tried
        resolve_files({"image_stream": "a.pt", "text_stream": "b.pt"}, other)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    fake = SimpleNamespace(model_name="ViT-L-14", pretrained="openai")
    with pytest.raises(CheckpointError, match=r"KEDs' image stream.*pass --image-stream PATH") as info:
        resolve_files({}, fake)
    assert "\n" not in str(info.value)


def test_run_and_sweep_through_the_cli_record_the_files(tmp_path, tiny_config, toy_root, released):
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
              "--no-cache", "--quiet", "--output", str(tmp_path / "res"), "--neighbours", str(K)]
    files = [arg for option in ("image_stream", "text_stream", "image_database", "text_database")
             for arg in (f"--{option.replace('_', '-')}", str(released.options[option]))]
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "keds", *files, "--text-stream-weight", "0:1:0.5", *common])
        assert res.exit_code == 0, res.output
        results = sorted((tmp_path / "res").rglob("keds*.json"))
        assert len(results) == 3, results
        record = json.loads(results[0].read_text())
        info = record["method"]["info"]
        assert info["database_rows"] == 40 and info["architecture"]["image_stream"]["fuse_layers"] == 3
        assert len(info["image_stream"]["sha256"]) == 64 and info["text_database"]["path"].endswith(".npy")
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        res = CliRunner().invoke(cli, ["run", "--method", "keds", *files, "--text-stream", str(bad), *common])
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
