"""MagicLens: its weights file, CLIP mapping, head and preprocessing against transcriptions of the official code
(google-deepmind/magiclens, scenic's CLIP, flax's serialization, jax.image.resize); the method through the loop."""

from __future__ import annotations

import copy
import json
import pickle
import re

import msgpack
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import registered
from PIL import Image
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.errors import CheckpointError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.methods.magiclens import model as ml
from cirbench.preprocess import Preprocessor, jax_linear_weights, jax_resize
from cirbench.testing import TINY_CLIP
from cirbench.types import Query

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


# -- jax.image.resize (jax/_src/image/scale.py), transcribed in numpy float32 -----------------------------------------
def compute_weight_mat(input_size, output_size, scale, translation, antialias=True):
    inv_scale = np.float32(1. / scale)
    kernel_scale = np.maximum(inv_scale, np.float32(1.)) if antialias else np.float32(1.)
    sample_f = ((np.arange(output_size, dtype=np.int32) + np.float32(0.5)).astype(np.float32) * inv_scale
                - np.float32(translation) * inv_scale - np.float32(0.5))
    x = (np.abs(sample_f[np.newaxis, :] - np.arange(input_size, dtype=sample_f.dtype)[:, np.newaxis])
         / kernel_scale)
    weights = np.maximum(np.float32(0), 1 - np.abs(x)).astype(np.float32)  # _fill_triangle_kernel
    total_weight_sum = np.sum(weights, axis=0, keepdims=True)
    weights = np.where(np.abs(total_weight_sum) > 1000. * np.finfo(np.float32).eps,
                       np.divide(weights, np.where(total_weight_sum != 0, total_weight_sum, 1)), 0)
    input_size_minus_0_5 = input_size - 0.5
    return np.where(np.logical_and(sample_f >= -0.5, sample_f <= input_size_minus_0_5)[np.newaxis, :], weights,
                    0).astype(np.float32)


def jax_image_resize(image, shape):
    """resize(image, shape, 'bilinear'): the dims whose size changes, scale out/in, no translation."""
    out = image.astype(np.float32)
    for d in range(image.ndim):
        if image.shape[d] != shape[d]:
            w = compute_weight_mat(image.shape[d], shape[d], shape[d] / image.shape[d], 0.)
            out = np.moveaxis(np.tensordot(np.moveaxis(out, d, -1), w, axes=([-1], [0])), -1, d)
    return out


def process_img(img, size):
    """data_utils.process_img then MagicLens._preprocess_images (square already: crop and resize are no-ops)."""
    ima = np.array(img.convert("RGB"))[np.newaxis, ...]
    ima = ima / (ima.max() + 1e-12)
    ima = jax_image_resize(ima.astype(np.float32), (1, size, size, 3))
    return ((ima - MEAN) / STD).astype(np.float32)[0].transpose(2, 0, 1)  # normalize_image; CHW


# -- flax.serialization.to_bytes, as msgpack_serialize writes it -------------------------------------------------------
def _ndarray_to_bytes(arr):
    return msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _ext_pack(x):
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(1, _ndarray_to_bytes(x))
    if isinstance(x, np.generic):
        return msgpack.ExtType(3, _ndarray_to_bytes(np.asarray(x)))
    return x


def flax_pickle(path, tree):
    """``pickle.dump(serialization.to_bytes(params))``, as the released .pkl files were written."""
    with open(path, "wb") as fh:
        pickle.dump(msgpack.packb(tree, default=_ext_pack, strict_types=True), fh)
    return path


# -- scenic's _convert_vars (torch OpenAI CLIP -> flax), transcribed; MagicLens names its blocks resblocks_{i} ---------
def scenic_params(torch_vars, dim_head):
    torch_vars = {k: v.detach().numpy() for k, v in torch_vars.items()}
    new_params, processed = {}, []
    for k, v in torch_vars.items():
        if "attn." in k:
            base = k[:k.rindex("attn.") + 5]
            if base in processed:
                continue
            processed.append(base)
            dim = torch_vars[base + "out_proj.bias"].shape[-1]
            heads = dim // dim_head
            new_params[base + "out.weight"] = torch_vars[base + "out_proj.weight"].T.reshape(heads, dim_head, dim)
            new_params[base + "out.bias"] = torch_vars[base + "out_proj.bias"]
            qkv_bias = torch_vars[base + "in_proj_bias"].reshape(3, heads, dim_head)
            qkv_kernel = np.transpose(torch_vars[base + "in_proj_weight"].reshape(3, heads, dim_head, dim),
                                      (0, 3, 1, 2))
            for i, kk in enumerate(("query", "key", "value")):
                new_params[base + f"{kk}.bias"] = qkv_bias[i]
                new_params[base + f"{kk}.weight"] = qkv_kernel[i]
        else:
            new_params[k] = v
    tree: dict = {}
    for torch_key, v in new_params.items():
        if "conv" in torch_key:
            v = v.transpose(2, 3, 1, 0)
        elif "weight" in torch_key and v.ndim == 2 and "embedding" not in torch_key:
            v = v.T
        jax_key = torch_key.replace("visual.proj", "visual.proj.kernel")
        jax_key = jax_key.replace("text_projection", "text_projection.kernel")
        jax_key = jax_key.replace(".weight", ".scale") if "ln" in jax_key else jax_key.replace(".weight", ".kernel")
        if jax_key.startswith(("transformer", "text_projection", "ln_final", "positional_embedding")):
            jax_key = "text." + jax_key
        jax_key = jax_key.replace("token_embedding.kernel", "text.token_embedding.embedding")
        jax_key = ("params.clip." + jax_key).replace(".", "/").replace("resblocks/", "resblocks_")
        node = tree
        *parents, leaf = jax_key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(v)
    return tree


# -- layers.py and MagicLens.__call__, transcribed in numpy ------------------------------------------------------------
def _ln(x, p, eps=1e-6):
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean(np.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * (1 + p["scale"]) + p["bias"]


def _proj(x, p, output_proj=False):
    ret = np.einsum("...NH,DNH->...D" if output_proj else "...D,DNH->...NH", x, p["w"])
    return ret + p["b"]


def _softplus(x):
    return np.log1p(np.exp(x))


def _attention(q_vector, k_vector, v_vector, p, hidden_dim, num_heads, use_per_dim_scale):
    query, key, value = _proj(q_vector, p["query"]), _proj(k_vector, p["key"]), _proj(v_vector, p["value"])
    if use_per_dim_scale:
        dim = query.shape[-1]
        query = query * (1.442695041 / np.sqrt(dim) * _softplus(p["per_dim_scale"]["per_dim_scale"]))
    else:
        query = query * (hidden_dim // num_heads) ** -0.5
    logits = np.einsum("BTNH,BSNH->BNTS", query, key)
    logits = 50.0 * np.tanh(logits / 50.0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    return _proj(np.einsum("BNTS,BSNH->BTNH", probs, value), p["post"], output_proj=True)


def official_head(params, img_embed, txt_embed, heads, pool_heads):
    x = np.concatenate([img_embed[:, None], txt_embed[:, None]], axis=1)
    d = x.shape[-1]
    enc = params["multimodal_encoder"]
    for i in range(len(enc)):
        layer = enc[f"x_layers_{i}"]
        xn = _ln(x, layer["layer_norm"])
        atten = _attention(xn, xn, xn, layer["self_attention"], d, heads, False) + x
        ff = layer["ff_layer"]
        y = _ln(atten, ff["layer_norm"])
        y = np.maximum(y @ ff["ffn_layer1"]["linear"]["w"] + ff["ffn_layer1"]["bias"]["b"], 0)
        x = y @ ff["ffn_layer2"]["linear"]["w"] + ff["ffn_layer2"]["bias"]["b"] + atten
    pool = params["contrastive_multimodal_pooler"]
    query = np.tile(pool["pooling_attn_query"][None], [x.shape[0], 1, 1])
    pooled = _ln(_attention(query, x, x, pool["pool_attn"], 4 * d, pool_heads, True), pool["pool_attn_ln"])[:, 0]
    return pooled / np.sqrt(np.sum(pooled * pooled, axis=-1, keepdims=True) + 1e-12)


def random_head(dim, heads, layers, pool_heads, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.3):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def attention(hidden, n, per_dim):
        dh = hidden // n
        out = {k: {"w": r(dim, n, dh), "b": r(n, dh, s=0.1)} for k in ("query", "key", "value")}
        out["post"] = {"w": r(dim, n, dh), "b": r(dim, s=0.1)}
        if per_dim:
            out["per_dim_scale"] = {"per_dim_scale": r(dh)}
        return out

    def norm():
        return {"scale": r(dim, s=0.1), "bias": r(dim, s=0.1)}

    encoder = {f"x_layers_{i}": {"layer_norm": norm(), "self_attention": attention(dim, heads, False),
                                  "ff_layer": {"layer_norm": norm(),
                                               "ffn_layer1": {"linear": {"w": r(dim, 4 * dim)},
                                                              "bias": {"b": r(4 * dim, s=0.1)}},
                                               "ffn_layer2": {"linear": {"w": r(4 * dim, dim)},
                                                              "bias": {"b": r(dim, s=0.1)}}}}
               for i in range(layers)}
    pooler = {"pool_attn": attention(4 * dim, pool_heads, True), "pool_attn_ln": norm(),
              "pooling_attn_query": r(1, dim)}
    return {"multimodal_encoder": encoder, "contrastive_multimodal_pooler": pooler}


# ---------------------------------------------------------------------------------------------------------------------
QUICK_TINY = {**TINY_CLIP, "quick_gelu": True}


@pytest.fixture(scope="module")
def quick_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "cirbench-tiny-quickgelu.json"
    path.write_text(json.dumps(QUICK_TINY))
    return path


@pytest.fixture(scope="module")
def backbone(quick_config):
    return load_backbone(str(quick_config), "none", device="cpu", seed=0)


@pytest.fixture(scope="module")
def release(backbone, tmp_path_factory):
    """A MagicLens .pkl for the tiny CLIP: its CLIP weights moved off the backbone's, a random head."""
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
             for k, v in backbone.model.state_dict().items()}
    tree = scenic_params(tuned, dim_head=16)
    head = random_head(32, heads=4, layers=2, pool_heads=4)
    tree["params"].update(head)
    path = flax_pickle(tmp_path_factory.mktemp("ml") / "magic_lens_clip_tiny.pkl", tree)
    return path, tuned, head


def test_the_resize_is_jax_image_resize(tmp_path):
    """jax_linear_weights is compute_weight_mat (downscale with antialias, upscale, odd sizes); a whole image."""
    for n_in, n_out in ((640, 224), (427, 224), (100, 224), (224, 224), (7, 3), (3, 7), (225, 224)):
        np.testing.assert_allclose(jax_linear_weights(n_in, n_out),
                                   compute_weight_mat(n_in, n_out, n_out / n_in, 0.), rtol=0, atol=1e-7)
    image = np.random.default_rng(0).random((3, 57, 91), dtype=np.float32)
    want = jax_image_resize(image, (3, 32, 32))
    np.testing.assert_allclose(jax_resize(image, 32), want, rtol=1e-5, atol=1e-6)


def test_the_magiclens_preprocessing_is_process_img(tmp_path):
    """Each image divided by its own largest value, squashed by the JAX resize, normalised; palette and dim
    images too; the per-image path and the loop's encode pipeline (float hand-over) agree."""
    from cirbench.encode import encode_images
    from cirbench.types import ImageRef

    rng = np.random.default_rng(3)
    images = [Image.fromarray((rng.random((40, 70, 3)) * 120).astype(np.uint8)),  # dim: max far below 255
              Image.fromarray((rng.random((90, 33, 3)) * 255).astype(np.uint8)).convert("P"),
              Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))]
    pre = Preprocessor("magiclens", size=32)
    refs = []
    for i, img in enumerate(images):
        want = process_img(img, 32)
        np.testing.assert_allclose(pre.from_pil(img).numpy(), want, rtol=1e-5, atol=2e-5)
        img.save(tmp_path / f"{i}.png")
        refs.append(ImageRef(str(i), tmp_path / f"{i}.png"))
    assert pre.identity()["scale"] == "per-image-max"
    with pytest.raises(ValueError, match="floating point"):
        pre.pil_uint8(images[0])
    seen = []
    for workers in (0, 1):
        encode_images(refs, lambda px: seen.append(px.clone()) or px.flatten(1)[:, :4], pre, batch_size=2,
                      workers=workers, progress=False)
    for batch in (torch.cat(seen[:2]), torch.cat(seen[2:])):
        for i, img in enumerate(images):
            np.testing.assert_allclose(batch[i].numpy(), process_img(img, 32), rtol=1e-5, atol=2e-5)


def test_the_released_weights_read_as_flax_wrote_them(tmp_path):
    """msgpack with flax's array extension, scalars, and arrays chunked as flax chunks those over 1 GiB."""
    big = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 3, "1": 4},
               "chunks": {"0": big.reshape(-1)[:5], "1": big.reshape(-1)[5:]}}
    tree = {"params": {"a": {"w": np.ones((2, 3), np.float16)}, "big": chunked, "s": np.float32(2.5),
                       "i": np.arange(3, dtype=np.int32)}}
    flat = ml.read_flax_weights(flax_pickle(tmp_path / "w.pkl", tree))
    assert flat["params/a/w"].dtype == torch.float16 and flat["params/a/w"].shape == (2, 3)
    assert torch.equal(flat["params/big"], torch.from_numpy(big)) and float(flat["params/s"]) == 2.5
    assert flat["params/i"].tolist() == [0, 1, 2]
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"not": "bytes"}))
    with pytest.raises(CheckpointError, match="not the bytes of serialized weights"):
        ml.read_flax_weights(tmp_path / "bad.pkl")
    (tmp_path / "junk.pkl").write_bytes(pickle.dumps(b"\xc1\xc1 not msgpack"))
    with pytest.raises(CheckpointError, match="not flax-serialized weights"):
        ml.read_flax_weights(tmp_path / "junk.pkl")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(print))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        ml.read_flax_weights(tmp_path / "evil.pkl")


@pytest.mark.parametrize("tree, said", [
    ({"w": np.array([1.0, np.nan], np.float32)}, " holds non-finite values \\(NaN or Inf\\) in w"),
    ({"a": {"w": np.array([np.inf], np.float16)}}, " holds non-finite values \\(NaN or Inf\\) in a/w"),
    ({"w": np.ones(2, np.complex64)}, ": an array of dtype 'complex64', which cirbench does not read"),
    ({"a": {"name": "kernel"}}, ": a/name holds a str, not an array"),
    ({"w": msgpack.ExtType(7, b"")}, ": a msgpack extension of type 7"),
])
def test_flax_weights_that_are_not_arrays_of_numbers_are_refused(tmp_path, tree, said):
    """A released .pkl whose arrays hold NaN/Inf, a dtype torch cannot hold, a leaf that is no array or an
    extension flax does not write is a one-line CheckpointError naming the file (never a half-read model)."""
    path = flax_pickle(tmp_path / "w.pkl", tree)
    with pytest.raises(CheckpointError, match=f"^checkpoint {re.escape(str(path))}{said}"):
        ml.read_flax_weights(path)


def test_the_clip_weights_map_back_onto_open_clip(backbone, release):
    """scenic's conversion of OpenAI CLIP, inverted: every tensor back in its place (the tuned weights)."""
    path, tuned, _ = release
    state = ml.clip_state(ml.read_flax_weights(path))
    own = {k: v for k, v in tuned.items() if k != "logit_scale"}
    assert set(state) == set(own)
    for k, v in own.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_queries_and_gallery_are_the_official_embeddings(backbone, release):
    """The head against a transcription of layers.py, on MagicLens's CLIP embeddings; the gallery with the empty
    text; the queries' texts as the official inference writes them."""
    path, tuned, head = release
    method = ml.MagicLens(backbone, {"checkpoint": str(path)}, "circo")
    tuned_model = copy.deepcopy(backbone.model)  # a plain copy holding the tuned weights
    tuned_model.load_state_dict(tuned)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img = tuned_model.encode_image(pixels).numpy()
        texts = ["", "find dogs but has two of them", "is red and has a logo"]
        txt = tuned_model.encode_text(backbone.tokenize(texts)).numpy()
    refs = method.encode_references(pixels)
    np.testing.assert_allclose(refs.numpy(), img, rtol=1e-5, atol=1e-5)
    gallery = method.encode_gallery(pixels)
    want = official_head(head, img, np.repeat(txt[:1], 3, 0), heads=4, pool_heads=4)
    np.testing.assert_allclose(gallery.numpy(), want, rtol=1e-4, atol=1e-5)
    circo = [Query("1", "r", ("has two of them",), extra={"shared_concept": "dogs"}),
             Query("2", "r", ("has two of them",), extra={"shared_concept": "dogs"})]
    want = official_head(head, img[:2], np.repeat(txt[1:2], 2, 0), heads=4, pool_heads=4)
    np.testing.assert_allclose(method.compose(refs[:2], circo).numpy(), want, rtol=1e-4, atol=1e-5)
    fiq = ml.MagicLens(backbone, {"checkpoint": str(path)}, "fashioniq")
    assert fiq.head is method.head  # one load per checkpoint on the backbone
    want = official_head(head, img[:1], txt[2:3], heads=4, pool_heads=4)
    np.testing.assert_allclose(fiq.compose(refs[:1], [Query("1", "r", ("is red", "has a logo"))]).numpy(), want,
                               rtol=1e-4, atol=1e-5)
    assert ml.query_text(Query("1", "r", ("a cartoon of ",), category="cartoon"), "imagenet-r") == \
        "find this object in cartoon"


def test_checkpoints_that_do_not_fit_are_one_line_errors(backbone, release, quick_config, tmp_path):
    path, _, _ = release
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(TINY_CLIP))
    with pytest.raises(CheckpointError, match="uses QuickGELU"):
        ml.MagicLens(load_backbone(str(plain), "none", device="cpu", seed=0), {"checkpoint": str(path)}, "circo")
    wider = tmp_path / "wide.json"
    wider.write_text(json.dumps({**QUICK_TINY, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 64}}))
    with pytest.raises(CheckpointError, match="does not fit this backbone.*pass --backbone"):
        ml.MagicLens(load_backbone(str(wider), "none", device="cpu", seed=0), {"checkpoint": str(path)}, "circo")
    with pytest.raises(CheckpointError, match="magiclens needs --checkpoint"):
        ml.MagicLens(backbone, {"checkpoint": None}, "circo")
    tree = {"params": {"clip": {}}}
    with pytest.raises(CheckpointError, match="not MagicLens weights"):
        ml.MagicLens(backbone, {"checkpoint": str(flax_pickle(tmp_path / "x.pkl", tree))}, "circo")


def test_through_the_loop_and_the_cli(backbone, release, quick_config, tmp_path, toy_root):
    """A run on the toy benchmark: gallery and reference features cached under the checkpoint's hash, the
    magiclens preprocessing recorded; the CLI says what is missing in one line."""
    path, _, _ = release
    cfg = RunConfig(method="magiclens", dataset="toy", split="val", backbone=str(quick_config), pretrained="none",
                    data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0, method_options={"checkpoint": str(path)})
    with registered(ToyPlugin(), "toy") as reg:
        (outcome,) = evaluate(cfg, reg)
        (again,) = evaluate(cfg, reg)
    assert outcome.record["preprocess"]["kind"] == "magiclens"
    assert outcome.record["method"]["info"]["sha256"] and again.metrics == outcome.metrics
    assert again.record["cache"]["misses"] == 0
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "magiclens", "--dataset", "toy", "--data-root",
                                       str(toy_root), "--backbone", str(quick_config), "--pretrained", "none",
                                       "--output", str(tmp_path / "r"), "--no-cache"])
    assert res.exit_code != 0 and "magiclens needs --checkpoint" in res.output and "Traceback" not in res.output
