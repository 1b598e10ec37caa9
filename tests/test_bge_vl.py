"""BGE-VL-CLIP: the query against a transcription of the official evaluation, on weights saved by transformers."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from annotations import ANNOTATIONS, needs_annotations
from click.testing import CliRunner
from generation_models import save_hf_clip, write_tiny_clip_text
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.plugins import get_registry
from cirbench.types import Query


def test_query_texts_are_the_released_query_files():
    """Rows of the official eval/data query files (CIRCO test ids 0 and 1; FashionIQ dress val's first two),
    made from the annotations as cirbench's loaders read them."""
    from cirbench.methods.bge_vl.model import query_text

    circo = [Query("0", "281438", ("has a higher quality and is taken during the daytime",),
                   extra={"shared_concept": "a man sitting on an outdoor toilet"}),
             Query("1", "251485", ("is in a room with wooden walls",), extra={"shared_concept": "a double bed"})]
    assert [query_text(q, "circo") for q in circo] == [
        "Find a picture that also a man sitting on an outdoor toilet, but has a higher quality and is taken during "
        "the daytime.",
        "Find a picture that also a double bed, but is in a room with wooden walls."]
    dress = [Query("0", "B005X4PL1G", ("is shiny and silver with shorter sleeves", "fit and flare")),
             Query("1", "B008XODTD0", ("is grey with black design", "is a light printed short dress"))]
    assert [query_text(q, "fashioniq") for q in dress] == [
        "is shiny and silver with shorter sleeves, and fit and flare",
        "is grey with black design, and is a light printed short dress"]
    assert query_text(Query("2", "r", ("has two dogs",)), "cirr") == "has two dogs"


# sha256 of "reference<TAB>text" lines, one per row, of the released query files (github.com/VectorSpaceLab/MegaPairs
# at ad99aca2f2e07d58e61e0c1825ea4ed6208cfc7c, eval/data/*_query*.jsonl: q_img's id, q_text), in their order
RELEASED_QUERY_FILES = {
    ("circo", "test"): (800, "fd94f03e667d010ece49602e3179524acdae4b24cb27da0c6270cc52828c2279"),
    ("dress", "val"): (2017, "48dccf752ecebad2d6e9acb2d78cdafecdea7a6887671fbc5152c244c81a4007"),
    ("shirt", "val"): (2038, "8263e5b38c13adb8791bb8e34b40179b8403617d498377c1bf01b3f6bf340640"),
    ("toptee", "val"): (1961, "b49ff41ff557d09889c11f0720edced3d5426b5a76afad69fc7d28dbab1dec90"),
}


@needs_annotations
@pytest.mark.parametrize("benchmark", sorted(RELEASED_QUERY_FILES), ids="-".join)
def test_every_query_text_is_the_released_query_files(benchmark, tmp_path):
    """Every query of CIRCO test and FashionIQ val, read by cirbench's loaders from the official annotation files,
    pairs its reference with the very text of BGE-VL's released query files (800 and 2,017 + 2,038 + 1,961 rows)."""
    from cirbench.methods.bge_vl.model import query_text

    name, split = benchmark
    if name == "circo":
        root = tmp_path / "circo"
        (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)  # no gallery needed for the texts
        (root / "annotations").symlink_to(ANNOTATIONS / "circo" / "annotations")
        dataset, options = "circo", {}
    else:
        root, dataset, options = ANNOTATIONS / "fashioniq", "fashioniq", {"category": name}
    evalsets = get_registry().dataset(dataset).create(root, options).load(split)
    queries = [q for es in evalsets for q in es.queries]
    lines = [f"{int(q.reference) if dataset == 'circo' else q.reference}\t{query_text(q, dataset)}" for q in queries]
    count, digest = RELEASED_QUERY_FILES[benchmark]
    assert len(lines) == count
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest, lines[:3]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("bge-vl")
    model = save_hf_clip(root / "clip", seed=3)
    tokenizer_folder = write_tiny_clip_text(root / "tokenizer", width=16)
    return root / "clip", model, tokenizer_folder


def test_compose_is_the_official_encode_mm_it(weights, tiny_config):
    """Flag_mmret.encode_mm_it: the tokenizer at max_length 75 with padding, get_text_features + get_image_features
    (unnormalised), normalised; a text longer than 75 tokens is cut there, not at CLIP's 77."""
    from transformers import CLIPTokenizer

    from cirbench.methods._shared.textinv import raw_image_features
    from cirbench.methods.bge_vl.model import BGEVL

    folder, hf, tokenizer_folder = weights
    bb = load_backbone(str(tiny_config), f"hf:{folder}", device="cpu")
    method = BGEVL(bb, {}, "fashioniq")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    long = " ".join(["a dress with red and blue stripes"] * 11)  # 77 words: cut at 75 tokens
    queries = [Query("a", "r", ("is red",)), Query("b", "r", ("is longer", "has stripes")), Query("c", "r", (long,))]
    ours = method.compose(raw_image_features(bb, pixels), queries)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    enc = tokenizer(["is red", "is longer, and has stripes", long], truncation=True, padding=True, max_length=75,
                    return_tensors="pt")
    assert enc["input_ids"].shape[1] == 75
    with torch.no_grad():
        text = hf.text_projection(hf.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[1])
        image = hf.visual_projection(hf.vision_model(pixel_values=pixels)[1])
    torch.testing.assert_close(ours, F.normalize(text + image, dim=-1), atol=2e-5, rtol=1e-4)
    # at CLIP's 77 tokens the long text's query differs: the cut matters
    full = F.normalize(bb._encode_texts([long]) + raw_image_features(bb, pixels[2:]), dim=-1)
    assert not torch.allclose(full, ours[2:], atol=1e-4)


def test_a_run_on_the_toy_benchmark(tmp_path, weights, tiny_config, toy_root):
    folder, _, _ = weights
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "bge-vl", "--dataset", "toy", "--data-root", str(toy_root),
                                       "--backbone", str(tiny_config), "--pretrained", f"hf:{folder}", "--no-cache",
                                       "--quiet", "--output", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "res").rglob("bge-vl*.json")
    record = json.loads(result.read_text())
    assert record["backbone"]["weights"]["kind"] == "transformers" and record["counts"]["queries"] == 12
