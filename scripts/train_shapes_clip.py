"""Train the small CLIP bundled with cirbench (``cirbench-shapes-clip``) on the shapes training corpus.

CPU-trainable in minutes: an open_clip custom config (64 px ViT, narrow text tower), contrastive
image-caption training on procedurally generated shapes with freshly sampled captions every step.
Writes ``model.safetensors`` (fp16), the config JSON and training facts into the output folder.

    python scripts/train_shapes_clip.py --out cirbench/assets/cirbench-shapes-clip --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "datasets" / "shapes"))
import generator as G  # noqa: E402  (the benchmark's own generator, imported without installing)

NAME = "cirbench-shapes-clip"
CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 160, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 3},
}
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def render_corpus(n: int, seed: int) -> tuple[torch.Tensor, list[G.Attributes]]:
    rng = random.Random(seed)
    combos = G.all_combinations()
    attrs = [rng.choice(combos) for _ in range(n)]
    images = np.stack([np.asarray(G.render(a, rng)) for a in attrs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), attrs


def normalise(batch_uint8: torch.Tensor) -> torch.Tensor:
    return (batch_uint8.float() / 255.0 - MEAN) / STD


def save(model: torch.nn.Module, out: Path) -> None:
    """Write the weights as fp16 safetensors (through a temporary file, so a reader never sees half)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "cirbench" / "assets" / NAME)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--corpus-size", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / f"{NAME}.json"
    config_path.write_text(json.dumps(CONFIG, indent=2) + "\n")
    open_clip.add_model_config(str(config_path))
    model = open_clip.create_model(NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(NAME)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params / 1e6:.2f} M", flush=True)

    t0 = time.time()
    images, attrs = render_corpus(args.corpus_size, seed=10_000 + args.seed)
    print(f"rendered {len(attrs)} images in {time.time() - t0:.1f} s", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    rng = random.Random(args.seed)
    model.train()
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = rng.sample(range(len(attrs)), args.batch_size)
        pixels = normalise(images[idx])
        texts = tokenizer([G.caption(attrs[i], rng) for i in idx])
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 300 == 299 and step != args.steps - 1:
            save(model, args.out)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f} "
                  f"{(time.time() - start) / (step + 1):.3f} s/step", flush=True)

    save(model, args.out)
    facts = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "corpus_size": args.corpus_size,
             "seed": args.seed, "params": n_params, "train_seconds": round(time.time() - start, 1),
             "threads": args.threads, "final_loss": round(loss.item(), 4), "torch": torch.__version__,
             "open_clip": open_clip.__version__}
    (args.out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
