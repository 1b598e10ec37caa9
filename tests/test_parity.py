"""Parity with the official code, as tested properties.

The oracles below are transcriptions of the official compositions (SEARLE ``data_utils.targetpad_transform``
with its ``TargetPad``, and CLIP's ``_transform``), built from torchvision and PIL exactly as those files do,
and of transformers 4.36's ``CLIPImageProcessor.preprocess`` as LinCIR's ``models.build_text_encoder`` builds it
(numpy and PIL, as ``image_transforms`` does).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms import functional as FT

from cirbench.encode import encode_images
from cirbench.preprocess import Preprocessor
from cirbench.types import ImageRef

# -- oracles (transcribed) ----------------------------------------------------------------------------------
# openai/CLIP clip/clip.py ``_transform`` (and open_clip's OPENAI_DATASET_MEAN/STD), written out here so that the
# oracles never take the constants from the code under test
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OfficialTargetPad:
    def __init__(self, target_ratio, size):
        self.size, self.target_ratio = size, target_ratio

    def __call__(self, image):
        w, h = image.size
        actual_ratio = max(w, h) / min(w, h)
        if actual_ratio < self.target_ratio:
            return image
        scaled_max_wh = max(w, h) / self.target_ratio
        hp = max(int((scaled_max_wh - w) / 2), 0)
        vp = max(int((scaled_max_wh - h) / 2), 0)
        return FT.pad(image, [hp, vp, hp, vp], 0, "constant")


def _convert_image_to_rgb(image):
    return image.convert("RGB")


def official_targetpad_transform(target_ratio, dim):
    return Compose([OfficialTargetPad(target_ratio, dim), Resize(dim, interpolation=InterpolationMode.BICUBIC),
                    CenterCrop(dim), _convert_image_to_rgb, ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])


def official_clip_transform(n_px):
    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px), _convert_image_to_rgb,
                    ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])


def official_hf_clip_processor(image, size=224, crop=224):
    """transformers 4.36 ``CLIPImageProcessor(size={'shortest_edge': 224}, crop_size=224x224, resample=3,
    do_convert_rgb=True, ...)`` on one PIL image: ``convert_to_rgb`` (a plain ``convert("RGB")``),
    ``get_resize_output_image_size`` + PIL ``resize``, ``center_crop`` (floored offsets), ``rescale`` (float64
    product, cast to float32) and ``normalize`` (float32), channels last until the end."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    arr = np.array(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    arr = arr[top : top + crop, left : left + crop]
    arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


# -- real-sized images of each mode -----------------------------------------------------------------------
REAL_SIZES = [(640, 427), (500, 375), (640, 480), (1024, 683), (480, 640), (612, 612), (375, 500), (800, 533),
              (1000, 200), (333, 500)]
MODES = ["RGB-jpg", "L-jpg", "CMYK-jpg", "RGB-png", "P-png", "RGBA-png", "LA-png"]


def _make(path, w, h, mode, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx * 3 + yy) * 100 / (w + h)], axis=-1)
    rgb = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    kind, ext = mode.split("-")
    if kind == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
        palette = img.getpalette()
        palette[:3] = [250, 20, 120]  # index 0 is not black: the official pad fills with index 0
        img.putpalette(palette)
    elif kind in ("RGBA", "LA"):
        img = rgb.convert(kind)
        alpha = np.clip((xx * 255 / w) + rng.normal(0, 40, (h, w)), 0, 255).astype(np.uint8)
        img.putalpha(Image.fromarray(alpha))
    else:
        img = rgb.convert(kind)
    img.save(path, quality=92) if ext == "jpg" else img.save(path)
    return path


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    refs = []
    for i, mode in enumerate(MODES):
        for j, (w, h) in enumerate(REAL_SIZES[i % 3 :: 3] if mode not in ("RGB-jpg",) else REAL_SIZES):
            path = _make(root / f"{mode}-{w}x{h}.{mode.split('-')[1]}", w, h, mode, i * 100 + j)
            refs.append(ImageRef(path.stem, path))
    return refs


def _ours(refs, kind, path):
    pre = Preprocessor(kind, 224)
    return encode_images(refs, lambda x: x.reshape(x.shape[0], -1), pre, batch_size=8, workers=0, progress=False,
                         path=path).view(-1, 3, 224, 224)


@pytest.mark.parametrize("kind", ["targetpad", "clip"])
@pytest.mark.parametrize("path", ["workers", "batched"])
def test_preprocessing_equals_the_official_pipelines(real_images, kind, path):
    oracle = official_targetpad_transform(1.25, 224) if kind == "targetpad" else official_clip_transform(224)
    expected = torch.stack([oracle(Image.open(r.path)) for r in real_images])
    got = _ours(real_images, kind, path)
    diff = (got - expected).abs()
    # bounded by zero: the per-image path runs the same PIL operations, the batched one reproduces PIL's
    # integer resampling exactly and libjpeg-turbo decodes JPEGs identically on the CPU
    assert float(diff.max()) == 0.0, {r.id: float(d.max()) for r, d in zip(real_images, diff, strict=True)
                                      if float(d.max()) > 0}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("path", ["workers", "batched"])
def test_every_clip_resize_a_backbone_may_declare_equals_open_clips_transform(real_images, interpolation, resize_mode,
                                                                              path):
    """``clip`` preprocessing follows the backbone's own ``interpolation`` and ``resize_mode``: each pair cirbench
    accepts gives the pixels of open_clip's ``image_transform`` for it (the transform open_clip builds for that
    model), on both encoding paths."""
    from open_clip.transform import image_transform

    from cirbench.preprocess import INTERPOLATIONS, RESIZE_MODES

    assert (interpolation, resize_mode) in {(i, r) for i in INTERPOLATIONS for r in RESIZE_MODES}
    oracle = image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, resize_mode=resize_mode,
                             interpolation=interpolation)
    refs = real_images[::3]
    expected = torch.stack([oracle(Image.open(r.path)) for r in refs])
    pre = Preprocessor("clip", 224, interpolation=interpolation, resize_mode=resize_mode)
    got = encode_images(refs, lambda x: x.reshape(x.shape[0], -1), pre, batch_size=8, workers=0, progress=False,
                        path=path).view(-1, 3, 224, 224)
    diff = (got - expected).abs()
    assert float(diff.max()) == 0.0, {r.id: float(d.max()) for r, d in zip(refs, diff, strict=True)
                                      if float(d.max()) > 0}


# shapes on both sides of Pillow 13's pass order (rows first where the height shrinks by more than twice as many
# pixels as the width): tall images beyond 2:1 resized by their short side, and squashed portraits
PASS_ORDER_SHAPES = [(333, 500), (400, 500), (225, 500), (300, 700), (230, 470), (240, 480), (500, 1200), (700, 300),
                     (224, 900), (200, 600), (500, 750)]


@pytest.mark.parametrize(("kind", "resize_mode"), [("clip", "shortest"), ("clip", "squash"), ("hf-clip", "shortest"),
                                                   ("targetpad", "shortest")])
@pytest.mark.parametrize("products", ["float64", "digits-float32", "digits-float64"])
def test_the_batched_path_runs_the_passes_in_the_installed_pillows_order(kind, resize_mode, products):
    """Each PIL pass rounds to uint8, so the order of the two passes moves pixels (up to a dozen grey levels on
    noise); Pillow 13 runs rows first for some shapes, earlier ones never. One chunk mixing both orders gives, image
    for image, the pixels of PIL's own resize (the per-image path), with every kind of products."""
    import PIL

    from cirbench.preprocess import PASS_ORDER, pil_vertical_first

    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in PASS_ORDER_SHAPES]
    pre = Preprocessor(kind, 112, resize_mode=resize_mode)
    expected = torch.stack([pre.pil_uint8(Image.fromarray(a)) for a in arrays]).float()
    got = pre.batch_uint8([torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays], products=products)
    assert torch.equal(got, expected), [PASS_ORDER_SHAPES[i] for i in range(len(arrays))
                                        if not torch.equal(got[i], expected[i])]
    # past one chunk, each chunk holds one pass order (one pair of products each), in the images' own order back
    calls = []
    resample = Preprocessor._resample

    def counted(self, images, plans, products, vertical_first):
        calls.append({p.vertical_first for p in plans} == {vertical_first})
        return resample(self, images, plans, products, vertical_first)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Preprocessor, "_resample", counted)
        tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
        assert torch.equal(pre.batch_uint8(tensors, chunk=4, products=products), expected)
    orders = [pre.plan(w, h).vertical_first for w, h in PASS_ORDER_SHAPES]
    assert all(calls) and len(calls) == -(-sum(orders) // 4) - (-(len(orders) - sum(orders)) // 4)
    assert (PASS_ORDER == "pillow-13") == (int(PIL.__version__.split(".")[0]) >= 13)
    if PASS_ORDER == "pillow-13" and kind != "targetpad":  # both orders are in the chunk (targetpad's never turn)
        assert any(orders) and not all(orders)
    elif kind == "targetpad":
        assert not any(orders)
    assert not pil_vertical_first(500, 400, 112, 112)
    assert pil_vertical_first(200, 600, 112, 112) == (PASS_ORDER == "pillow-13")


@pytest.mark.parametrize(("rule", "shape", "first"), [
    ("horizontal-first", (10, 5000, 10, 224), False),
    ("pillow-12.2", (10, 1001, 10, 224), True),  # Image.resize: over 100 times taller than wide, the height shrinking
    ("pillow-12.2", (10, 1000, 10, 224), False),
    ("pillow-12.2", (10, 1001, 10, 2000), False),
    ("pillow-12.2", (200, 600, 112, 112), False),
    ("pillow-13", (200, 600, 112, 112), True),  # ImagingResampleInner: 488 > 2 x 88
    ("pillow-13", (240, 480, 112, 223), True),  # 257 > 2 x 128
    ("pillow-13", (240, 480, 112, 224), False),  # 256 > 256 fails: the comparison is strict
    ("pillow-13", (100, 200, 300, 150), True),  # the width grows: any shrinking height qualifies
    ("pillow-13", (100, 200, 50, 200), False),  # the height does not shrink
])
def test_each_pillows_pass_order_as_its_source_has_it(rule, shape, first):
    from cirbench.preprocess import pil_vertical_first

    assert pil_vertical_first(*shape, rule=rule) is first


@pytest.mark.parametrize(("version", "rule"), [
    ("11.3.0", "horizontal-first"), ("12.1.1", "horizontal-first"), ("12.2.0", "pillow-12.2"),
    ("12.3.0", "pillow-12.2"), ("13.0.0", "pillow-13"), ("13", "pillow-13"), ("14.1.0.dev0", "pillow-13")])
def test_the_pass_order_rule_follows_the_installed_pillows_version(monkeypatch, version, rule):
    import PIL

    from cirbench.preprocess import _pass_order

    monkeypatch.setattr(PIL, "__version__", version)
    assert _pass_order() == rule


EDGE_SIZES = [(1, 1), (1, 500), (500, 1), (2, 3), (223, 225), (224, 224), (225, 223), (100, 80), (80, 100),
              (300, 90), (90, 300), (1000, 40), (40, 1000), (224, 1000), (1000, 224), (1500, 1499), (447, 1001)]


@pytest.mark.parametrize(("kind", "resize_mode", "interpolation"), [
    ("clip", "shortest", "bicubic"), ("clip", "squash", "bicubic"), ("clip", "shortest", "bilinear"),
    ("clip", "squash", "bilinear"), ("hf-clip", "shortest", "bicubic"), ("targetpad", "shortest", "bicubic")])
def test_the_batched_path_gives_pils_pixels_at_every_size(kind, resize_mode, interpolation):
    """Edge sizes (one pixel, a single row or column, one pixel off the input side, up- and downscaling on either
    axis, extreme aspect ratios) and random ones, in chunks of mixed sizes: PIL's own pixels, image for image."""
    rng = np.random.default_rng(11)
    sizes = EDGE_SIZES + [(int(w), int(h)) for w, h in rng.integers(1, 1200, (12, 2))]
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    pre = Preprocessor(kind, 224, resize_mode=resize_mode, interpolation=interpolation)
    expected = torch.stack([pre.pil_uint8(Image.fromarray(a)) for a in arrays]).float()
    got = pre.batch_uint8([torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays], chunk=8)
    assert [sizes[i] for i in range(len(sizes)) if not torch.equal(got[i], expected[i])] == []


def test_pillows_own_resize_turns_where_the_rule_says(monkeypatch):
    """The rule transcribed from Pillow's ``ImagingResampleInner`` against the installed Pillow itself: a one-shot
    resize equals the two one-axis resizes in the order the rule gives, and not the other order."""
    from cirbench.preprocess import pil_vertical_first

    rng = np.random.default_rng(8)
    for w, h in [(333, 500), (400, 500), (101, 300), (120, 300), (60, 40)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = (56, 56)
        once = np.asarray(image.resize(out, Image.Resampling.BICUBIC)).astype(int)
        across = np.asarray(image.resize((out[0], h), Image.Resampling.BICUBIC).resize(out, Image.Resampling.BICUBIC))
        down = np.asarray(image.resize((w, out[1]), Image.Resampling.BICUBIC).resize(out, Image.Resampling.BICUBIC))
        first, other = (down, across) if pil_vertical_first(w, h, *out) else (across, down)
        assert np.array_equal(once, first.astype(int)), (w, h)
        assert not np.array_equal(once, other.astype(int)), (w, h)  # noise: the two orders never agree


@pytest.mark.parametrize("path", ["workers", "batched"])
def test_hf_clip_preprocessing_equals_the_transformers_processor_lincir_uses(real_images, path):
    expected = torch.stack([official_hf_clip_processor(Image.open(r.path)) for r in real_images])
    got = _ours(real_images, "hf-clip", path)
    diff = (got - expected).abs()
    assert float(diff.max()) == 0.0, {r.id: float(d.max()) for r, d in zip(real_images, diff, strict=True)
                                      if float(d.max()) > 0}
    # and it is a recipe of its own: the floored crop moves a 640x427 image by one pixel, and palette images are
    # resized after their conversion to RGB
    clip = _ours(real_images, "clip", path)
    moved = {r.id for r, a, b in zip(real_images, got, clip, strict=True) if not torch.equal(a, b)}
    assert {"RGB-jpg-640x427", "RGB-png-1024x683", "P-png-500x375"} <= moved and "RGB-jpg-640x480" not in moved


def test_the_installed_transformers_processor_agrees(real_images):
    """The same against the installed transformers' own CLIP processor (its PIL backend). transformers 5
    composites transparent images onto white before converting them, so the images with alpha are left out."""
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class(crop_size={"height": 224, "width": 224}, do_center_crop=True, do_convert_rgb=True,
                                do_normalize=True, do_rescale=True, do_resize=True, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD), resample=3, size={"shortest_edge": 224})
    opaque = [r for r in real_images if not r.id.startswith(("RGBA", "LA"))]
    expected = torch.stack([torch.as_tensor(np.asarray(processor(Image.open(r.path))["pixel_values"][0]))
                            for r in opaque])
    assert torch.equal(_ours(opaque, "hf-clip", "workers"), expected)


def _skip_without_torchcodec() -> None:
    """Skip where TorchCodec is not installed, or its wheel was built for another torch and does not load."""
    from cirbench import images

    try:
        images._torchcodec()
    except Exception as exc:  # noqa: BLE001 - ImportError, or the native library's own error
        pytest.skip(f"TorchCodec does not load here ({type(exc).__name__}: {str(exc)[:80]}); "
                    "pip install cirbench[codec]")


@pytest.mark.parametrize("library", ["torchcodec", "torchvision", "pil"])
def test_every_image_decoder_gives_the_official_pixels(real_images, library, monkeypatch):
    """The batched path decodes with torchvision.io (deprecated since 0.29), else TorchCodec, else PIL: each
    gives the official pipeline's pixels, and the result records which one ran."""
    from cirbench import images
    from cirbench.encode import image_library

    if library == "torchcodec":
        _skip_without_torchcodec()
    monkeypatch.setenv("CIRBENCH_IMAGE_DECODER", library)
    images.tensor_decoder.cache_clear()
    try:
        assert image_library().split()[0] == library
        oracle = official_targetpad_transform(1.25, 224)
        expected = torch.stack([oracle(Image.open(r.path)) for r in real_images])
        assert float((_ours(real_images, "targetpad", "batched") - expected).abs().max()) == 0.0
    finally:
        images.tensor_decoder.cache_clear()


def test_image_decoder_choice_fails_clearly(monkeypatch):
    from cirbench import images
    from cirbench.errors import CirbenchError, UnknownNameError

    def missing():
        raise ImportError("No module named 'torchcodec'")

    try:
        monkeypatch.setenv("CIRBENCH_IMAGE_DECODER", "torchcodc")
        images.tensor_decoder.cache_clear()
        with pytest.raises(UnknownNameError, match="did you mean 'torchcodec'"):
            images.tensor_decoder()
        monkeypatch.setattr(images, "_torchcodec", missing)
        monkeypatch.setenv("CIRBENCH_IMAGE_DECODER", "torchcodec")
        images.tensor_decoder.cache_clear()
        with pytest.raises(CirbenchError, match="CIRBENCH_IMAGE_DECODER=torchcodec cannot decode here.*ImportError"):
            images.tensor_decoder()
        monkeypatch.delenv("CIRBENCH_IMAGE_DECODER")  # by default a library that does not load is passed over
        images.tensor_decoder.cache_clear()
        assert images.tensor_decoder().name == "torchvision"
        monkeypatch.setattr(images, "_torchvision", missing)  # a torchvision without its decoders, and no TorchCodec
        images.tensor_decoder.cache_clear()
        assert images.tensor_decoder() is None
    finally:
        images.tensor_decoder.cache_clear()


def test_torchcodec_takes_over_once_torchvision_lacks_its_decoders(monkeypatch):
    _skip_without_torchcodec()
    from cirbench import images
    from cirbench.encode import image_library

    def removed():
        raise ImportError("cannot import name 'decode_jpeg' from 'torchvision.io'")

    monkeypatch.setattr(images, "_torchvision", removed)
    monkeypatch.delenv("CIRBENCH_IMAGE_DECODER", raising=False)
    images.tensor_decoder.cache_clear()
    try:
        assert image_library().startswith("torchcodec ")
        assert images.decode_bytes(images._tiny_jpeg()).shape == (3, 1, 2)
    finally:
        images.tensor_decoder.cache_clear()


def test_old_preprocessing_would_have_differed(real_images):
    """The audit's two findings are real on these files: rounding the long side and converting palette/RGBA
    images to RGB before resizing both change pixels (so the test above can fail)."""
    ref = next(r for r in real_images if r.id == "RGB-jpg-640x427")
    img = Image.open(ref.path)
    floor = FT.resize(img, 224, interpolation=InterpolationMode.BICUBIC).size
    rounded = (round(640 * 224 / 427), 224)
    assert floor == (335, 224) and rounded == (336, 224)
    pal = next(r for r in real_images if r.id.startswith("P-png"))
    official = official_clip_transform(224)(Image.open(pal.path))
    rgb_first = official_clip_transform(224)(Image.open(pal.path).convert("RGB"))
    assert float((official - rgb_first).abs().max()) > 0.1


def test_quick_gelu_for_openai_tags_offline():
    """OpenAI weights need QuickGELU; open_clip 3.x builds GELU for ViT-B-32 unless told. Built here with the
    tag's config and no weights (offline)."""
    import open_clip

    from cirbench.backbones import activation_of, needs_quick_gelu

    assert needs_quick_gelu("ViT-B-32", "openai") and needs_quick_gelu("ViT-L-14", "openai")
    assert not needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert needs_quick_gelu("ViT-B-32-quickgelu", "none")
    plain = open_clip.create_model("ViT-B-32", pretrained=None)
    assert activation_of(plain) == "gelu"  # what a bare create_model builds: the bug
    fixed = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=needs_quick_gelu("ViT-B-32", "openai"))
    assert activation_of(fixed) == "quick_gelu"


def test_activation_is_part_of_the_identity(tiny_config):
    from cirbench.backbones import load_backbone

    bb = load_backbone(str(tiny_config), "none", device="cpu")
    assert bb.identity()["activation"] == "gelu"
    assert load_backbone(str(tiny_config), "none", device="cpu").identity() == bb.identity()


def test_bf16_casts_weights_once_and_records_precision(tiny_config):
    from cirbench.backbones import load_backbone

    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="bf16")
    assert bb.precision == "bf16" and bb.input_dtype == torch.bfloat16
    assert bb.model.visual.conv1.weight.dtype == torch.bfloat16
    feats = bb.encode_image(torch.randn(2, 3, 32, 32))
    assert feats.dtype == torch.float32 and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert load_backbone(str(tiny_config), "none", device="cpu").precision == "fp32"  # the default


# -- the batched path's exact integer products on every device ---------------------------------------------
def _emulated_bf16_tensor_cores(a, b):
    """bf16 operands, float32 accumulation and output: what ``torch.bmm(..., out_dtype=torch.float32)`` does on
    a GPU's tensor cores (the CPU has no such kernel, so the operands are widened, losslessly, to float32)."""
    if a.dtype == torch.bfloat16:
        return torch.bmm(a.float(), b.float())
    return torch.bmm(a, b)


def _decoded_rgb(refs):
    from torchvision.io import ImageReadMode, decode_image

    return [decode_image(str(r.path), mode=ImageReadMode.RGB) for r in refs if r.id.startswith(("RGB-jpg", "L-jpg"))]


@pytest.mark.parametrize("kind", ["targetpad", "clip", "hf-clip"])
@pytest.mark.parametrize("products", ["digits-float32", "digits-bf16", "digits-float64"])
def test_every_product_layout_gives_pils_pixels(real_images, kind, products, monkeypatch):
    import cirbench.preprocess as P

    monkeypatch.setattr(P, "_bmm", _emulated_bf16_tensor_cores)
    images = _decoded_rgb(real_images)
    pre = Preprocessor(kind, 224)
    oracle = torch.stack([pre.pil_uint8(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images]).float()
    assert torch.equal(pre.batch_uint8(images, products="float64"), oracle)
    assert torch.equal(pre.batch_uint8(images, products=products), oracle)


def test_bf16_products_with_bf16_output_are_never_exact(monkeypatch):
    """The GPU default is chosen by a probe: bf16 operands pass only with float32 accumulation *and* output.
    A plain bf16 ``torch.bmm`` (bf16 output, what the batched path once used) rounds sums to 8 bits and fails."""
    import cirbench.preprocess as P

    monkeypatch.setattr(P, "_bmm", _emulated_bf16_tensor_cores)
    assert P._probe_bf16_digits(torch.device("cpu"))
    monkeypatch.setattr(P, "_bmm", torch.bmm)
    assert not P._probe_bf16_digits(torch.device("cpu"))
    assert P.auto_products(torch.device("cpu")) == "float64"  # and the CPU never probes
    assert not P.bf16_digit_products_are_exact(torch.device("cpu"))


def test_the_probe_runs_the_real_operand_layouts(monkeypatch):
    """A bf16 kernel exact on contiguous operands but misreading a transposed, sliced one (as the horizontal
    pass passes it), or one of the other pass order's shapes, would give wrong pixels silently: the probe runs a
    real chunk in both orders and refuses it."""
    import cirbench.preprocess as P

    def misreads_strides(a, b):
        if a.dtype == torch.bfloat16 and not b.is_contiguous():
            b = b.contiguous().view(b.shape[0], b.shape[2], b.shape[1]).transpose(1, 2)  # ignores the layout
        return _emulated_bf16_tensor_cores(a, b)

    def misreads_wide_rows(a, b):  # wrong only on the rows-first pass order's first product (3 x 640 columns)
        out = _emulated_bf16_tensor_cores(a, b)
        return out + 1 if a.dtype == torch.bfloat16 and b.shape[2] > 3 * 224 else out

    monkeypatch.setattr(P, "_bmm", misreads_strides)
    assert not P._probe_bf16_digits(torch.device("cpu"))
    monkeypatch.setattr(P, "_bmm", misreads_wide_rows)
    assert not P._probe_bf16_digits(torch.device("cpu"))
    monkeypatch.setattr(P, "_bmm", _emulated_bf16_tensor_cores)
    assert P._probe_bf16_digits(torch.device("cpu"))


def test_float32_digit_sums_stay_exact_or_fall_back(monkeypatch):
    """Digit products are exact while every partial sum is below 2**24: true up to sides of tens of thousands of
    pixels; past that (a 65,535-pixel JPEG side) the batch is computed in float64 instead."""
    import cirbench.preprocess as P

    for side, exact in ((640, True), (4000, True), (20000, True), (65535, False)):
        _, coef = P.axis_taps(side, 0, 0, 224, 0, 224)
        assert (P.digit_sum_bound(torch.from_numpy(coef)) < P.FLOAT32_EXACT) is exact, side
    seen = []

    def spy(a, b):
        seen.append(a.dtype)
        return torch.bmm(a, b)

    monkeypatch.setattr(P, "_bmm", spy)
    pre = Preprocessor("clip", 8, resize_mode="squash")  # squashed, as COCO object regions are
    small = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    pre.batch_uint8([small], products="digits-float32")
    assert seen == [torch.float32, torch.float32]
    seen.clear()
    wide = torch.randint(0, 256, (3, 2, 40000), dtype=torch.uint8)  # 40,000 -> 8 columns: a 5,000x downscale
    got = pre.batch_uint8([wide], products="digits-float32")
    assert seen == [torch.float64, torch.float64]
    assert torch.equal(got, pre.batch_uint8([wide], products="float64"))


def test_chunks_group_like_sizes_and_keep_the_order(real_images):
    """Past one chunk, images are processed in chunks of like sizes (less padding in each product) and put
    back in their own order: the same pixels as image by image."""
    images = _decoded_rgb(real_images)
    assert len({tuple(im.shape) for im in images}) > 3
    pre = Preprocessor("targetpad", 32)
    alone = torch.cat([pre.batch_uint8([im]) for im in images])
    assert torch.equal(pre.batch_uint8(images, chunk=3), alone)
    assert torch.equal(pre.batch_uint8(images[::-1], chunk=4), alone.flip(0))


@pytest.mark.parametrize("products", ["float64", "digits-float32"])
def test_a_mixed_chunk_is_exact_whatever_its_scratch_memory_held(real_images, products, monkeypatch):
    """Smaller images in a chunk leave margins in its scratch canvas; their coefficients are zero, but 0 * NaN
    is NaN, so the margins must be cleared: scratch memory filled with NaN changes nothing."""
    real_empty = torch.empty

    def nan_empty(*shape, dtype=None, **kw):
        out = real_empty(*shape, dtype=dtype, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    images = _decoded_rgb(real_images)
    pre = Preprocessor("targetpad", 32)
    alone = torch.cat([pre.batch_uint8([im], products=products) for im in images])
    monkeypatch.setattr(torch, "empty", nan_empty)
    assert torch.equal(pre.batch_uint8(images, products=products), alone)


@pytest.mark.parametrize("products", ["float64", "digits-float32"])
def test_a_chunk_of_one_size_is_stacked_and_exact(real_images, products):
    """The usual chunk (like sizes, grey JPEGs among colour ones) is stacked in one copy: the same pixels as
    one image at a time."""
    images = _decoded_rgb(real_images)
    shape = max({tuple(im.shape) for im in images}, key=lambda s: sum(tuple(im.shape) == s for im in images))
    same = [im for im in images if tuple(im.shape) == shape]
    grey = same[0][:1].clone()  # a one-channel image of the same size, as a grey JPEG decodes with mode L
    same = [*same, grey]
    assert len(same) >= 3
    pre = Preprocessor("targetpad", 32)
    alone = torch.cat([pre.batch_uint8([im], products=products) for im in same])
    assert torch.equal(pre.batch_uint8(same, products=products), alone)


def test_normalising_a_batch_builds_no_tensor_from_host_lists(monkeypatch):
    """Mean and std are made once per device: a tensor built from a Python list on a GPU is a copy from pageable
    memory, which waits for all the work queued on the stream (every batch, in the staging threads)."""
    import cirbench.preprocess as P

    pre = Preprocessor("clip", 8)
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    first = pre.normalize(pixels)

    def no_host_lists(*args, **kwargs):
        raise AssertionError("torch.tensor called while normalising a batch")

    monkeypatch.setattr(P.torch, "tensor", no_host_lists)
    assert torch.equal(pre.normalize(pixels), first)


def _encoded(image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_decoded_bytes_are_pils_pixels_in_every_format(monkeypatch, decoder):
    """Training corpora read any format through ``Preprocessor.from_bytes`` (and :func:`decode_bytes`): its
    pixels are PIL's and the official transform's. The tensor decoders disagree with PIL on 16-bit PNGs
    (torchvision returns uint16, TorchCodec scales by 1/257, PIL clips at 255) and animated GIFs (every frame,
    not the first), and converting RGBA or palette images to RGB before the resize (as decoding them to tensors
    does) moves pixels by up to 2 in normalised units: such files go through PIL."""
    if decoder == "torchcodec":
        _skip_without_torchcodec()
    from cirbench import images
    from cirbench.preprocess import Preprocessor

    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    cases = {
        "16-bit PNG": _encoded(Image.fromarray(rng.integers(0, 600, (20, 30), dtype=np.uint16)), "PNG"),
        "animated GIF": _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "RGBA PNG": _encoded(Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)), "PNG"),
        "palette PNG": _encoded(frames[1].convert("P"), "PNG", transparency=3),
        "CMYK JPEG": _encoded(frames[2].convert("CMYK"), "JPEG"),
        "RGB JPEG": _encoded(frames[2], "JPEG"),
        "WEBP": _encoded(frames[0], "WEBP", lossless=True),
    }
    monkeypatch.setenv("CIRBENCH_IMAGE_DECODER", decoder)
    images.tensor_decoder.cache_clear()
    try:
        assert images.tensor_decoder().name == decoder
        from cirbench.types import PREPROCESS_KINDS

        for what, data in cases.items():
            official = images.rgb_tensor(Image.open(io.BytesIO(data)))
            decoded = images.decode_bytes(data, what)
            assert decoded.dtype == torch.uint8 and torch.equal(decoded, official), what
            for kind in PREPROCESS_KINDS:  # every kind, the floating one (magiclens) included
                pre = Preprocessor(kind, 16)
                assert torch.equal(pre.from_bytes(data, what), pre.from_pil(Image.open(io.BytesIO(data)))), (what,
                                                                                                             kind)
    finally:
        images.tensor_decoder.cache_clear()
