"""RTD: the training step against the official one (github.com/jaeseokbyun/RTD, train_text_encoder.py and
utils.contrastive_loss, transcribed below), the tuned text tower's isolation from the shared backbone, and
evaluation as LinCIR's through the tuned tower."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.checkpoints import save_checkpoint
from cirbench.cli import cli
from cirbench.corpora import Batch, open_corpus
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.methods._shared import towers
from cirbench.methods._shared.textinv import Phi, encode_with_pseudo_tokens
from cirbench.methods.rtd import model as rtd


# -- the official loss, transcribed (utils.contrastive_loss; `device` is the module's global there) ----------------
def contrastive_loss(v1, v2, temperature, device="cpu"):
    v1 = F.normalize(v1, dim=1)
    v2 = F.normalize(v2, dim=1)
    numerator = torch.exp(torch.diag(torch.inner(v1, v2)) / temperature)
    numerator = torch.cat((numerator, numerator), 0)
    joint_vector = torch.cat((v1, v2), 0)
    pairs_product = torch.exp(torch.mm(joint_vector, joint_vector.t()) / temperature)
    denominator = torch.sum(pairs_product - pairs_product * torch.eye(joint_vector.shape[0]).to(device), 0)
    return -torch.mean(torch.log(numerator / denominator))


@pytest.fixture(scope="module")
def phi_file(tmp_path_factory):
    """A LinCIR-format Phi (dict with 'Phi') for the tiny backbone (embedding 32, token width 32)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("phi") / "phi.pt"
    torch.save({"Phi": Phi(32, 128, 32).state_dict()}, path)
    return path


TRIPLETS = [("a red car on a road", "is blue instead", "a blue car on a road"),
            ("two dogs on the grass", "has a cat too", "two dogs and a cat on the grass"),
            ("a <PERSON> holding a $5 note", "holds a coin", "a person holding a coin"),
            ("an empty table", "has a cup on it", "a cup on a table")]


def test_the_text_tower_copy_leaves_the_shared_backbone_alone(tiny_config):
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0)
    before = bb.state_token()
    view = towers.text_tower_copy(bb.model)
    assert view.visual is bb.model.visual  # the image tower is shared, not copied
    assert all(p is not q for (_, p), (_, q) in zip(towers.part_parameters(view), towers.part_parameters(bb.model),
                                                      strict=True))
    tokens = bb.tokenize(["a red car"])
    plain = bb.model.encode_text(tokens)
    assert torch.equal(view.encode_text(tokens), plain)
    with torch.no_grad():
        for _, p in towers.part_parameters(view):
            p.add_(0.01)
    assert not torch.allclose(view.encode_text(tokens), plain)
    assert torch.equal(bb.model.encode_text(tokens), plain) and bb.state_token() == before


def test_the_training_step_is_the_official_one(tiny_config, phi_file):
    """One step as train_text_encoder.py takes it: concat prompts then "a photo of $" against the targets then the
    reference captions (refined batch sampling), $ = Phi(reference embedding + noise) twice, the official NT-Xent;
    gradients reach the tuned tower only."""
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    before = bb.state_token()
    trainable = rtd.RTDTrainable(bb, {"phi": str(phi_file), "noise": 0.5, "tau": 0.07})
    refs, conds, targets = (list(column) for column in zip(*TRIPLETS, strict=True))
    batch = Batch(torch.empty(4, 0), targets, {"reference_caption": refs, "conditioning_caption": conds})
    torch.manual_seed(11)
    loss, _ = trainable.training_step(batch)
    torch.manual_seed(11)
    clean_refs = ["a red car on a road", "two dogs on the grass", "a person holding a 5 note", "an empty table"]
    with torch.no_grad():
        target_embeddings = bb.model.encode_text(bb.tokenize(targets + clean_refs)).float()
        reference_embeddings = bb.model.encode_text(bb.tokenize(clean_refs)).float()
        input_features = reference_embeddings.clone()
        input_features += 0.5 * torch.rand(input_features.shape[0]).unsqueeze(-1) * torch.randn(input_features.shape)
        estimated = trainable.phi(input_features)
    estimated = torch.cat((estimated, estimated), dim=0)
    prompts = ["a photo of $ that " + c for c in conds] + ["a photo of $"] * 4
    concat = encode_with_pseudo_tokens(trainable.tuned, prompts, estimated, "$", normalize=False)
    want = contrastive_loss(target_embeddings, concat, 0.07)
    assert torch.allclose(loss, want, atol=1e-5), (float(loss), float(want))
    loss.backward()
    grads = {name for name, p in trainable.named_trainable_parameters() if p.grad is not None}
    assert grads and {n.split(".")[0] for n in grads} <= set(towers.TEXT_PARTS)
    assert all(p.grad is None for p in trainable.phi.parameters()) and bb.state_token() == before


def _corpus(path, rows=TRIPLETS * 6, drop=None):
    with open(path, "w") as fh:
        for ref, cond, target in rows:
            record = {"reference_caption": ref, "conditioning_caption": cond, "target_caption": target, "id": 1}
            record.pop(drop, None)
            fh.write(json.dumps(record) + "\n")
    return path


def test_training_writes_a_checkpoint_that_evaluates_as_lincir_through_its_tower(tiny_config, phi_file, tmp_path,
                                                                                  toy_root):
    """`cirbench train --method rtd` on JSON-lines triplets; its checkpoint evaluates on the shared gallery
    features. A checkpoint holding the untouched tower ranks exactly as LinCIR with the same Phi does."""
    out = tmp_path / "rtd"
    res = CliRunner().invoke(cli, ["train", "--method", "rtd", "--corpus", str(_corpus(tmp_path / "t.jsonl")),
                                   "--output", str(out), "--backbone", str(tiny_config), "--pretrained", "none",
                                   "--phi", str(phi_file), "--batch-size", "8", "--max-steps", "3", "--lr", "1e-3",
                                   "--workers", "0", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "rtd" and config["phi"]["source"] == str(phi_file) and config["tau"] == 0.07
    assert config["train"]["lr"] == 1e-3 and config["train"]["weight_decay"] == 0.01
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0)
    untouched = tmp_path / "untouched"
    save_checkpoint(untouched, {**{k: v for k, v in towers.part_state(bb.model).items()},
                                **{"phi." + k: v for k, v in torch.load(phi_file)["Phi"].items()}},
                    {"method": "rtd", "backbone": bb.identity(), "phi": {"source": str(phi_file)}})

    def run(method, checkpoint):
        cfg = RunConfig(method=method, dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                        data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                        progress=False, bootstrap=0, method_options={"checkpoint": str(checkpoint)},
                        label=f"{method}-{checkpoint.name}")
        with registered(ToyPlugin(), "toy") as reg:
            (outcome,) = evaluate(cfg, reg)
        return outcome

    lincir, same, tuned = run("lincir", phi_file), run("rtd", untouched), run("rtd", out)
    assert same.record["cache"]["misses"] == 0 and tuned.record["cache"]["misses"] == 0  # LinCIR's gallery features
    rows = [[json.loads(line)["scores"] for line in o.predictions_path.read_text().splitlines()]
            for o in (lincir, same, tuned)]
    assert rows[1] == rows[0] and same.metrics == lincir.metrics
    assert rows[2] != rows[0]  # the tuned tower composes other queries
    assert tuned.record["method"]["info"]["phi"]["source"] == str(phi_file)


def test_bad_input_is_one_line(tiny_config, phi_file, tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "no-condition.jsonl", drop="conditioning_caption")
    res = CliRunner().invoke(cli, ["train", "--method", "rtd", "--corpus", str(corpus), "--output",
                                   str(tmp_path / "o"), "--backbone", str(tiny_config), "--pretrained", "none",
                                   "--phi", str(phi_file), "--max-steps", "1", "--quiet"])
    assert res.exit_code == 2 and "row 1 has no conditioning_caption" in res.output
    # shards carry a caption per sample, not the triplet's other fields: one line when the first batch comes
    from test_training import _shards

    spec = _shards(tmp_path / "shards", [6])
    res = CliRunner().invoke(cli, ["train", "--method", "rtd", "--corpus", spec, "--output", str(tmp_path / "s"),
                                   "--backbone", str(tiny_config), "--pretrained", "none", "--phi", str(phi_file),
                                   "--max-steps", "1", "--batch-size", "2", "--workers", "0", "--quiet"])
    assert res.exit_code == 2 and "samples have no reference_caption, conditioning_caption, which method 'rtd'" \
        in res.output, res.output
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0)
    with pytest.raises(CheckpointError, match="rtd needs --checkpoint: RTD's authors released no weights"):
        rtd.RTD(bb, {"checkpoint": None}, "cirr")
    with pytest.raises(CheckpointError, match="LinCIR's demo weights are for ViT-L-14/openai.* pass --phi"):
        rtd.RTDTrainable(bb, {})
    # on ViT-L-14/openai the default Phi is LinCIR's demo file; offline, the error says where to pass one
    from cirbench import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(bb, "model_name", "ViT-L-14")
    monkeypatch.setattr(bb, "pretrained", "openai")
    with pytest.raises(CheckpointError, match=r"lincir_large.pt\).*pass --phi PATH"):
        rtd.RTDTrainable(bb, {})


def test_json_corpora_are_records(tmp_path):
    records = [{"target_caption": "a blue car", "reference_caption": "a red car", "n": 3},
               {"reference_caption": "no target here"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    corpus = open_corpus(tmp_path / "a.json", images=False, caption_columns=("target_caption",))
    assert corpus.rows == [(None, "a blue car", {"reference_caption": "a red car", "n": 3}),
                           (None, "", {"reference_caption": "no target here"})]  # skipped when read: no caption
    assert corpus[1] is None and corpus[0]["caption"] == "a blue car"
    (tmp_path / "b.jsonl").write_text('{"caption": "one"}\n\n{"caption": "two", "x": 1}\n')
    assert [r[1] for r in open_corpus(tmp_path / "b.jsonl", images=False).rows] == ["one", "two"]
    for name, text, message in (("c.jsonl", '{"caption": "one"}\n{"caption": \n', "is unreadable"),
                                ("d.json", '{"caption": "one"}', "expected JSON objects"),
                                ("e.json", '["one"]', "expected JSON objects")):
        (tmp_path / name).write_text(text)
        with pytest.raises(CirbenchError, match=message):
            open_corpus(tmp_path / name, images=False)
    with pytest.raises(CirbenchError, match="row 2 has no target_caption"):
        open_corpus(tmp_path / "a.json", images=False, required_columns=("target_caption",))
