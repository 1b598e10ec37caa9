"""Core building blocks: options and sweeps, preprocessing, metrics, chunked ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cirbench.errors import CirbenchError
from cirbench.metrics import hits_matrix, map_at_k, recall_at_k
from cirbench.preprocess import Preprocessor, targetpad_amounts
from cirbench.retrieval import rank, rank_candidates
from cirbench.types import OptionSpec, expand_sweep, resolve_options

ALPHA = OptionSpec("alpha", "weight", "float", 0.5, per_dataset={"cirr": 0.9}, sweepable=True)


def test_options_defaults_per_dataset_and_sweeps():
    assert resolve_options([ALPHA], {}, "cirr", "m") == [{"alpha": 0.9}]
    assert resolve_options([ALPHA], {}, "circo", "m") == [{"alpha": 0.5}]
    assert resolve_options([ALPHA], {"alpha": "0.7"}, "cirr", "m") == [{"alpha": 0.7}]
    assert [o["alpha"] for o in resolve_options([ALPHA], {"alpha": "0.5:0.7:0.1"}, None, "m")] == [0.5, 0.6, 0.7]
    assert expand_sweep(ALPHA, "0.1,0.3") == [0.1, 0.3]
    assert expand_sweep(ALPHA, "0.3,0.1,0.30,0.3") == [0.3, 0.1]  # a value given twice runs once, in order
    with pytest.raises(CirbenchError, match="unknown option --beta.*--alpha"):
        resolve_options([ALPHA], {"beta": "1"}, None, "method m")
    with pytest.raises(CirbenchError, match="not a valid float"):
        resolve_options([ALPHA], {"alpha": "high"}, None, "m")
    with pytest.raises(CirbenchError, match="step > 0"):
        resolve_options([ALPHA], {"alpha": "0.9:0.1:0.1"}, None, "m")


def test_a_bool_option_is_switched_on_and_off_by_bare_flags():
    flag = OptionSpec("query_expansion", "expand", "bool", True)
    assert resolve_options([flag], {"no_query_expansion": None}, None, "m") == [{"query_expansion": False}]
    assert resolve_options([flag], {"query_expansion": None}, None, "m") == [{"query_expansion": True}]
    assert resolve_options([flag], {"query_expansion": "off"}, None, "m") == [{"query_expansion": False}]
    with pytest.raises(CirbenchError, match="--no-query-expansion takes no value"):
        resolve_options([flag], {"no_query_expansion": "true"}, None, "m")
    with pytest.raises(CirbenchError, match="--query-expansion and --no-query-expansion contradict"):
        resolve_options([flag], {"no_query_expansion": None, "query_expansion": "1"}, None, "m")
    with pytest.raises(CirbenchError, match="unknown option --no-alpha"):  # not a bool: no switch
        resolve_options([ALPHA], {"no_alpha": None}, None, "m")


def _official_targetpad(img: Image.Image, ratio: float = 1.25) -> Image.Image:
    """The PIL padding step as the official SEARLE/FTI4CIR TargetPad describes it: pad each side of the
    short dimension by int((max(w, h) / ratio - short) / 2)."""
    w, h = img.size
    if max(w, h) / min(w, h) < ratio:
        return img
    hp = max(int((max(w, h) / ratio - w) / 2), 0)
    vp = max(int((max(w, h) / ratio - h) / 2), 0)
    padding = (hp, vp, hp, vp)
    out = Image.new("RGB", (w + padding[0] + padding[2], h + padding[1] + padding[3]))
    out.paste(img, (padding[0], padding[1]))
    return out


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 100), (100, 300), (500, 500), (123, 97)])
def test_targetpad_amounts_reach_the_ratio(size):
    w, h = size
    left, top, right, bottom = targetpad_amounts(w, h, 1.25)
    nw, nh = w + left + right, h + top + bottom
    if max(w, h) / min(w, h) < 1.25:
        assert (left, top, right, bottom) == (0, 0, 0, 0)
    else:
        assert max(nw, nh) / min(nw, nh) == pytest.approx(1.25, abs=0.02)
        assert left == right and top == bottom  # symmetric


def test_the_default_pixel_limit_is_pils_and_its_edge_is_inclusive():
    """The default limit is PIL's own decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS`` as PIL sets it);
    an image of exactly that many pixels passes, one more is refused, before and after the resize."""
    from cirbench.errors import ImageError
    from cirbench.preprocess import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)
    pre = Preprocessor("clip", 224, max_pixels=224 * 300)
    assert pre.plan(224, 300).resized == (224, 300)
    with pytest.raises(ImageError, match="exceeds the pixel limit of 67,200"):
        pre.plan(225, 300)
    assert pre.plan(100, 134).resized == (224, 300)  # a small image upscaled to exactly the limit
    with pytest.raises(ImageError, match="would be resized to 224x302, over the pixel limit of 67,200"):
        pre.plan(100, 135)


def test_preprocessing_matches_pil_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 300, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    for kind in ("clip", "targetpad"):
        pre = Preprocessor(kind=kind, size=64)
        ours = pre(torch.from_numpy(arr).permute(2, 0, 1))
        ref_img = _official_targetpad(pil) if kind == "targetpad" else pil
        w, h = ref_img.size
        scale = 64 / min(w, h)
        ref_img = ref_img.resize((max(64, round(w * scale)), max(64, round(h * scale))), Image.BICUBIC)
        left, top = (ref_img.size[0] - 64) // 2, (ref_img.size[1] - 64) // 2
        ref = torch.from_numpy(np.array(ref_img.crop((left, top, left + 64, top + 64)))).permute(2, 0, 1)
        ref = pre.normalize(ref.float())
        assert ours.shape == (3, 64, 64)
        # PIL rounds to uint8 after resizing; differences stay at rounding level on average
        assert (ours - ref).abs().mean() < 0.05, kind


def test_batched_preprocessing_equals_per_image():
    pre = Preprocessor(kind="targetpad", size=32)
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((40, 90), (64, 64), (120, 50))]
    assert torch.allclose(pre.batch(imgs), torch.stack([pre(i) for i in imgs]))


def test_recall_and_map_hand_worked():
    ranked = torch.tensor([[3, 1, 2, 0], [0, 1, 2, 3]])
    targets = [[1, 0], [3]]
    hits = hits_matrix(ranked, targets)
    assert hits.tolist() == [[False, True, False, True], [False, False, False, True]]
    assert recall_at_k(hits, (1, 2, 4)) == {1: 0.0, 2: 50.0, 4: 100.0}
    # query 0: AP@4 = (1/2 + 2/4) / min(2, 4) = 0.5 ; query 1: AP@4 = (1/4) / 1 = 0.25
    assert map_at_k(hits, [2, 1], (4,))[4] == pytest.approx(37.5)
    # AP@2: q0 = (1/2)/min(2,2) = 0.25 ; q1 = 0
    assert map_at_k(hits, [2, 1], (2,))[2] == pytest.approx(12.5)


def test_whole_ranking_average_precision_is_the_mean_precision_at_the_positives():
    """PatternCom's official ``metrics_calc`` AP, transcribed: the mean of the precision at each positive's rank, 0
    for a query without positives; rows with none, one (first and last place) and many positives."""
    from cirbench.metrics import average_precision_per_query

    def official(row):
        precisions, found = [], 0
        for k, rel in enumerate(row, start=1):
            if rel:
                found += 1
                precisions.append(found / k)
        return sum(precisions) / len(precisions) * 100 if precisions else 0

    gen = torch.Generator().manual_seed(5)
    hits = torch.rand(12, 60, generator=gen) < 0.1
    hits[0], hits[1], hits[2] = False, False, False
    hits[1, 0], hits[2, -1] = True, True
    ours = average_precision_per_query(hits)
    assert ours[:3].tolist() == [0.0, 100.0, pytest.approx(100 / 60)]
    for q in range(hits.shape[0]):
        assert ours[q].item() == pytest.approx(official(hits[q].tolist()), abs=1e-12)


def test_metric_edge_cases_stay_finite():
    from cirbench.metrics import ap_per_query, mean

    # a short ranking's empty slots (-1) are never hits, even for a target list padded with -1
    ranked = torch.tensor([[2, -1, -1], [-1, -1, -1]])
    hits = hits_matrix(ranked, [[2], [5, 6]])
    assert hits.tolist() == [[True, False, False], [False, False, False]]
    # a query with no relevant item scores AP 0, not 0/0 (which would drop it from the mean as nan)
    ap = ap_per_query(torch.tensor([[False, False]]), [0], (2,))[2]
    assert ap.tolist() == [0.0]
    # nan marks a query a metric does not count; a metric no query counts reports 0, never nan in a result file
    assert mean(torch.tensor([float("nan"), 50.0, 100.0])) == 75.0
    assert mean(torch.tensor([float("nan")])) == 0.0
    assert mean(torch.tensor([])) == 0.0


def test_chunked_ranking_equals_full_sort_and_excludes():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(37, 16), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(101, 16), dim=-1)
    exclude = torch.randint(0, 101, (37,))
    idx, scores = rank(q, g, 10, exclude=exclude, query_chunk=8, gallery_chunk=13)
    sims = q @ g.T
    sims[torch.arange(37), exclude] = float("-inf")
    ref_scores, ref_idx = sims.topk(10, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(scores, ref_scores)
    assert not (idx == exclude[:, None]).any()
    cand = rank_candidates(q[:2], g, [[5, 7, 9], []])
    assert sorted(cand[0]) == [5, 7, 9] and cand[1] == []
    assert (g[cand[0]] @ q[0]).diff().le(0).all()
    # the tensor form pads a query with fewer candidates with -1 / -inf (never a gallery position)
    rows, idx, scores = rank_candidates(q[:2], g, [[5, 7, 9], [4]], with_scores=True)
    assert idx[0].tolist() == rows[0] and idx[1].tolist() == [4, -1, -1]
    # the candidate's score is its cosine (a batched product and a lone dot product may differ in the last bit,
    # depending on the CPU's vector path)
    assert scores[1, 1:].eq(float("-inf")).all() and torch.isclose(scores[1, 0], g[4] @ q[1], rtol=0, atol=1e-6)


def test_ties_keep_gallery_order():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    idx, _ = rank(q, g, 3, gallery_chunk=2)
    assert idx.tolist() == [[1, 2, 3]]


def test_files_nested_past_the_parser_limit_are_malformed_not_a_crash(tmp_path):
    from cirbench.checkpoints import load_checkpoint
    from cirbench.errors import CheckpointError
    from cirbench.results import read_result

    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000)
    with pytest.raises(CirbenchError, match="is unreadable: nested too deeply"):
        read_result(deep)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_bytes(b"{\"a\": " + b"[" * 100_000)
    with pytest.raises(CheckpointError, match="is corrupt: nested too deeply"):
        load_checkpoint(folder, "slerp-tat")


def test_a_path_option_is_named_by_what_it_holds(tmp_path):
    """A file: its sha256. A checkpoint folder: the names and contents of the files directly in it (its weights
    and config), not its subfolders (a training run's resumable state) or hidden files; nothing there: missing."""
    import hashlib

    from cirbench.util import content_digest

    weights = tmp_path / "run" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    (tmp_path / "run" / "config.json").write_text("{}")
    assert content_digest(weights) == hashlib.sha256(b"weights").hexdigest()
    folder = content_digest(tmp_path / "run")
    assert folder.startswith("folder:")
    (tmp_path / "run" / "checkpoint-latest").mkdir()
    (tmp_path / "run" / "checkpoint-latest" / "optimizer.pt").write_bytes(b"state")
    (tmp_path / "run" / ".lock").write_text("")
    assert content_digest(tmp_path / "run") == folder
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert content_digest(tmp_path / "copy") == folder  # wherever it lies
    (tmp_path / "copy" / "config.json").write_text('{"step": 2}')
    assert content_digest(tmp_path / "copy") != folder
    (tmp_path / "copy" / "config.json").rename(tmp_path / "copy" / "config2.json")
    assert content_digest(tmp_path / "copy") != folder
    assert content_digest(tmp_path / "nothing") == "missing"


@pytest.mark.parametrize("span", [60, 400])  # rankings of much of the gallery (a target mask) or a top few (searches)
def test_hits_are_the_ranked_entries_among_the_targets(monkeypatch, span):
    """Against the definition, with empty slots (-1), empty and repeated target lists, in small blocks."""
    from cirbench import metrics

    gen = torch.Generator().manual_seed(0)
    ranked = torch.randint(-1, span, (37, 25), generator=gen)
    targets = [sorted(set(torch.randint(0, span, (int(n),), generator=gen).tolist())) if n else []
               for n in torch.randint(0, 12, (37,), generator=gen)]
    for q in range(0, 37, 2):  # every other query (the first and the last among them) holds ranked entries
        targets[q] = sorted(set(targets[q]) | {r for r in ranked[q, q % 5 :: 7].tolist() if r >= 0})
    targets[3] = [5, 5, 7]
    ranked[5, 3], targets[5] = 0, [0, *targets[5]]  # gallery position 0 is a position like any other
    expected = torch.tensor([[r >= 0 and r in set(t) for r in row] for row, t in zip(ranked.tolist(), targets,
                                                                                   strict=True)])
    monkeypatch.setattr(metrics, "HITS_BLOCK", 130)  # a few queries a block
    assert expected[0].any() and expected[-1].any() and int(expected.sum()) >= 40
    assert torch.equal(hits_matrix(ranked, targets), expected)
    assert not hits_matrix(ranked, [[] for _ in targets]).any()


def test_a_ranking_made_in_parts_of_whole_query_chunks_is_the_ranking_at_once():
    """The loop ranks a set too large at once in parts of whole RANK_QUERY_CHUNK blocks: the same products, so the
    same scores bit for bit and the same order."""
    from cirbench.retrieval import RANK_QUERY_CHUNK

    gen = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(2 * RANK_QUERY_CHUNK + 5, 24, generator=gen), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(300, 24, generator=gen), dim=-1)
    idx, scores = rank(q, g, 300, backend="torch")
    step = RANK_QUERY_CHUNK
    parts = [rank(q[s : s + step], g, 300, backend="torch") for s in range(0, len(q), step)]
    assert torch.equal(torch.cat([p[0] for p in parts]), idx) and torch.equal(torch.cat([p[1] for p in parts]), scores)


def test_typed_option_values_are_checked_not_converted():
    """Recorded options (a result file's) and the Python API's come typed: each is checked against its option."""
    from cirbench.types import parse_option_value

    flag, count, ratio = OptionSpec("flag", "", "bool", False), OptionSpec("n", "", "int", 1, minimum=1), \
        OptionSpec("alpha", "", "float", 0.5, maximum=1.0)
    assert parse_option_value(flag, True) is True and parse_option_value(count, 3) == 3
    assert parse_option_value(ratio, 1) == 1 and parse_option_value(flag, "yes") is True
    for spec, value, said in [(flag, 1, "is not a bool"), (flag, "maybe", "is not a valid bool"),
                              (count, True, "is not a finite int"), (count, {"a": 1}, "is not a finite int"),
                              (count, 0, "below its minimum"), (ratio, 2.0, "above its maximum"),
                              (ratio, float("nan"), "is not a finite float")]:
        with pytest.raises(CirbenchError, match=said):
            parse_option_value(spec, value)
