"""CompoDiff's denoiser: a transformer that denoises a CLIP image embedding conditioned on text, image and mask,
its cosine noise schedule, and the DDIM sampler with CompoDiff's two-scale classifier-free guidance.

Follows the official ``compodiff/models.py`` (github.com/navervision/CompoDiff: ``CompoDiffNetwork``,
``CrossTransformer``, ``Attention``, ``CrossAttention``, ``FeedForward``, ``RelPosBias``, ``NoiseScheduler`` and
``CompoDiff.p_sample_loop_ddim`` with ``build_compodiff``'s settings), checked against a transcription of it
(tests/test_compodiff.py), and once against the official file itself run with the packages it imports (random
weights, its noise draws replayed: the same embeddings within 3e-6):

* two tokens, the noisy image embedding and the timestep's embedding (sinusoidal, then a 2-layer SiLU MLP), pass
  through ``depth`` blocks of self-attention, cross-attention and a SwiGLU feed-forward, each pre-normed and added
  to its input; the output at the first token is the predicted clean embedding (``predict_x_start``);
* self-attention is multi-query (one key/value head), cosine-similarity attention at scale 16 with a learned null
  key/value in front, rotary embeddings on the first ``min(32, dim_head)`` features of queries and keys, and a T5
  relative-position bias over ``(tokens, tokens + 1)`` positions (the null key's included, as officially);
* cross-attention reads the context ``[text tokens (projected from the text encoder's width), image condition,
  mask embedding]`` with a learned null key/value per head, in 8 heads of ``dim_head`` (``CrossTransformer`` does
  not pass its ``heads`` on, so CrossAttention keeps its default); the norms are gain-only LayerNorms (eps 1e-5 in
  float32), the final one "stable" (divided by each row's maximum first);
* sampling is DDIM with ``eta`` 1 on ``steps`` times ``linspace(-1, T, steps + 1)[:-1]`` truncated to integers
  (so ``steps - 1`` evaluations of the network), reading ``alphas_cumprod_prev`` at those times, as the official
  loop does; guidance evaluates (image, text), (image, negative text) and (no image, negative text) and mixes
  them as ``none + s_text (full - no_text) + s_image (no_text - none)``; ``samples`` draws per query are
  averaged.

The official loop draws its noise from torch's global generator for the whole batch; here each query draws its own
from a generator seeded by the run's sampling seed and the query's id, so that a query's embedding does not depend
on the batch it is composed in or on the device.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cirbench.errors import CheckpointError

NULL_SCALE = 16.0  # Attention(cosine_sim=True, cosine_sim_scale=16)
BUCKETS, MAX_DISTANCE = 32, 128  # RelPosBias's defaults
ETA = 1.0  # p_sample_loop_ddim's default, which CompoDiff.sample keeps


@dataclass(frozen=True)
class Architecture:
    """The denoiser's sizes (the released CompoDiff-Aesthetic: 768, 12 blocks, 16 self-attention heads and 8
    cross-attention heads of 64, text 1280, 1000 diffusion steps)."""

    dim: int = 768
    depth: int = 12
    heads: int = 16
    dim_head: int = 64
    cross_heads: int = 8
    text_width: int = 1280
    ff_mult: int = 4
    mask_side: int = 64
    timesteps: int = 1000

    def record(self) -> dict:
        return asdict(self)


class GainNorm(nn.Module):
    """The official ``LayerNorm``: a gain and no bias; eps 1e-5 in float32 (1e-3 in lower precision). ``stable``:
    each row divided by its maximum first."""

    def __init__(self, dim: int, stable: bool = False):
        super().__init__()
        self.stable = stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True)
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class MLP(nn.Module):
    """``depth`` Linear+SiLU layers of ``expansion x dim_out`` units, then a Linear; in float32 (the official
    ``MLP``, whose parameter names this keeps)."""

    def __init__(self, dim_in: int, dim_out: int, expansion: float = 2.0, depth: int = 2):
        super().__init__()
        hidden = int(expansion * dim_out)
        layers: list[nn.Module] = [nn.Sequential(nn.Linear(dim_in, hidden), nn.SiLU())]
        layers += [nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU()) for _ in range(depth - 1)]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``SinusoidalPosEmb``: ``[sin(t w), cos(t w)]`` with ``w_i = 10000^(-i / (dim/2 - 1))``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -(math.log(10000) / (half - 1)))
    angles = t[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rotary_frequencies(dim_head: int) -> torch.Tensor:
    """rotary_embedding_torch's ``RotaryEmbedding(dim=min(32, dim_head))`` frequencies (``freqs_for='lang'``)."""
    rot = min(32, dim_head)
    return 1.0 / (10000 ** (torch.arange(0, rot, 2)[: rot // 2].float() / rot))


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the sequence axis (-2) at positions 0..n-1, on the first ``2 len(freqs)`` features,
    rotating interleaved pairs ``(x1, x2) -> (-x2, x1)`` as rotate_half does."""
    n, rot = x.shape[-2], 2 * len(freqs)
    angles = torch.arange(n, device=x.device, dtype=freqs.dtype)[:, None] * freqs.to(x.device)[None, :]
    angles = angles.repeat_interleave(2, dim=-1).to(x.dtype)
    head, rest = x[..., :rot], x[..., rot:]
    pairs = head.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return torch.cat([head * angles.cos() + turned * angles.sin(), rest], dim=-1)


def relative_buckets(i: int, j: int, device: torch.device) -> torch.Tensor:
    """``RelPosBias._relative_position_bucket`` of query positions ``0..i-1`` against key positions ``0..j-1``."""
    rel = torch.arange(j, device=device)[None, :] - torch.arange(i, device=device)[:, None]
    n = (-rel).clamp(min=0)
    exact = BUCKETS // 2
    far = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(MAX_DISTANCE / exact)
                   * (BUCKETS - exact)).long()
    return torch.where(n < exact, n, far.clamp(max=BUCKETS - 1))


class _Attention(nn.Module):
    """What both official attentions hold: a pre-norm, bias-free query and key/value projections (``kv_heads``
    heads of keys and values), a learned null key/value of one head's width, and the output projection, gain-normed
    (the official parameter names)."""

    def __init__(self, dim: int, heads: int, dim_head: int, kv_heads: int):
        super().__init__()
        self.heads = heads
        self.norm = GainNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), GainNorm(dim))


class SelfAttention(_Attention):
    """The official ``Attention`` as ``CrossTransformer`` builds it: multi-query (one head of keys and values),
    cosine similarity, rotary, null key/value, relative-position bias."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__(dim, heads, dim_head, kv_heads=1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [b, h, n, d]
        k, v = self.to_kv(x).chunk(2, dim=-1)  # [b, n, d]: one head of keys and values for every query head
        q, k = rotate(q, freqs), rotate(k, freqs)
        k = torch.cat([self.null_kv[0].expand(b, 1, -1), k], dim=1)
        v = torch.cat([self.null_kv[1].expand(b, 1, -1), v], dim=1)
        root = math.sqrt(NULL_SCALE)
        q, k = F.normalize(q, dim=-1) * root, F.normalize(k, dim=-1) * root
        sim = torch.einsum("bhid,bjd->bhij", q, k) + bias
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype)
        out = torch.einsum("bhij,bjd->bhid", attn, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class CrossAttention(_Attention):
    """The official ``CrossAttention`` (``cosine_sim=False``): dot products at ``dim_head^-0.5``, the null
    key/value in front of the context in every head."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__(dim, heads, dim_head, kv_heads=heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = split(self.to_q(self.norm(x)))
        k, v = (split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        k = torch.cat([self.null_kv[0].expand(b, self.heads, 1, -1), k], dim=2)
        v = torch.cat([self.null_kv[1].expand(b, self.heads, 1, -1), v], dim=2)
        scale = q.shape[-1] ** -0.25  # sqrt(dim_head^-0.5) on each side
        sim = (q * scale) @ (k * scale).transpose(-1, -2)
        attn = sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype)
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Gain-norm, a bias-free projection to ``2 x mult x dim``, SwiGLU, a bias-free projection back."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.norm = GainNorm(dim)
        self.up = nn.Linear(dim, 2 * mult * dim, bias=False)
        self.down = nn.Linear(mult * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(h * F.silu(gate))


class Block(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.attn = SelfAttention(arch.dim, arch.heads, arch.dim_head)
        self.cross = CrossAttention(arch.dim, arch.cross_heads, arch.dim_head)
        self.ff = FeedForward(arch.dim, arch.ff_mult)


class Denoiser(nn.Module):
    """``CompoDiffNetwork`` with its ``CrossTransformer``: the predicted clean image embedding ``[B, 1, D]`` from
    the noisy one, the conditions and the timestep."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.text_in = nn.Linear(arch.text_width, arch.dim)
        self.time_mlp = MLP(arch.dim, arch.dim)
        self.mask_mlp = MLP(arch.mask_side ** 2, arch.dim)
        self.rel_bias = nn.Embedding(BUCKETS, arch.heads)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm_out = GainNorm(arch.dim, stable=True)
        self.project_out = nn.Linear(arch.dim, arch.dim, bias=False)
        self.register_buffer("rotary", rotary_frequencies(arch.dim_head), persistent=False)

    def forward(self, image_embed: torch.Tensor, image_cond: torch.Tensor, text_cond: torch.Tensor,
                mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time_mlp(sinusoidal(t.to(image_embed.dtype), self.arch.dim)).unsqueeze(1)
        mask_embed = self.mask_mlp(mask.flatten(1)).unsqueeze(1)
        x = torch.cat([image_embed, time], dim=1)
        context = torch.cat([self.text_in(text_cond), image_cond, mask_embed], dim=1)
        n = x.shape[1]
        bias = self.rel_bias(relative_buckets(n, n + 1, x.device)).permute(2, 0, 1)
        for block in self.layers:
            x = block.attn(x, bias, self.rotary) + x
            x = block.cross(x, context) + x
            x = block.ff(x) + x
        return self.project_out(self.norm_out(x))[:, :1]

    def guided(self, x: torch.Tensor, image_cond: torch.Tensor, text_cond: torch.Tensor, negative: torch.Tensor,
               mask: torch.Tensor, t: torch.Tensor, image_scale: float, text_scale: float) -> torch.Tensor:
        """``forward_with_cond_scale`` with a pair of scales: (image, text), (image, negative text) and (no
        image, negative text) in one batch, mixed."""
        full, no_text, none = self(x.repeat(3, 1, 1), torch.cat([image_cond, image_cond, torch.zeros_like(image_cond)]),
                                   torch.cat([text_cond, negative, negative]), mask.repeat(3, 1, 1),
                                   t.repeat(3)).chunk(3)
        return none + (full - no_text) * text_scale + (no_text - none) * image_scale


class Schedule:
    """``NoiseScheduler(beta_schedule='cosine')``'s quantities the sampler reads, computed in float64 and kept in
    float32 as the official buffers are."""

    def __init__(self, timesteps: int, s: float = 0.008):
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        cumprod = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
        cumprod = cumprod / cumprod[0]
        self.betas = torch.clip(1 - (cumprod[1:] / cumprod[:-1]), 0, 0.999)
        alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0).float()
        self.sqrt_recip = torch.sqrt(1.0 / alphas_cumprod).float()
        self.sqrt_recipm1 = torch.sqrt(1.0 / alphas_cumprod - 1).float()
        self.timesteps = timesteps

    def ddim_pairs(self, steps: int) -> list[tuple[int, int]]:
        """The official (time, next time) pairs for ``steps`` sampling steps, from T down to -1."""
        times = torch.linspace(-1.0, self.timesteps, steps=steps + 1)[:-1]
        order = list(reversed(times.int().tolist()))
        return list(zip(order[:-1], order[1:], strict=True))


@dataclass(frozen=True)
class Guidance:
    steps: int = 10
    image_scale: float = 1.5
    text_scale: float = 7.5
    samples: int = 2


@torch.no_grad()
def sample(net: Denoiser, schedule: Schedule, image_cond: torch.Tensor, text_cond: torch.Tensor,
           negative: torch.Tensor, mask: torch.Tensor, guidance: Guidance,
           generators: list[torch.Generator]) -> torch.Tensor:
    """``CompoDiff.sample``: ``guidance.samples`` DDIM draws per query (``image_cond`` ``[B, 1, D]``, the text
    conditions ``[B, L, W]``, ``mask`` ``[B, side, side]``), averaged: ``[B, D]``, not normalised. Query ``b``'s
    noise comes from ``generators[b]`` (on the CPU, in float32), its initial draw first, then one per step."""
    r, dim, device = guidance.samples, net.arch.dim, image_cond.device
    pairs = schedule.ddim_pairs(guidance.steps)
    draws = [torch.randn((1 + len(pairs)) * r, 1, dim, generator=g).unflatten(0, (1 + len(pairs), r))
             for g in generators]
    noise = torch.stack(draws, dim=1).flatten(1, 2).to(device)  # [1 + steps, B * r, 1, D]
    ic, tc, nc, m = (t.repeat_interleave(r, dim=0) for t in (image_cond, text_cond, negative, mask))
    x = noise[0]
    alphas, recip, recipm1 = (v.to(device) for v in (schedule.alphas_cumprod_prev, schedule.sqrt_recip,
                                                      schedule.sqrt_recipm1))
    for step, (time, after) in enumerate(pairs, start=1):
        a, a_next = alphas[time], alphas[after]
        t = torch.full((len(x),), time, device=device, dtype=torch.long)
        x0 = net.guided(x, ic, tc, nc, m, t, guidance.image_scale, guidance.text_scale)
        if after < 0:
            x = x0
            continue
        eps = (recip[time] * x - x0) / recipm1[time]
        c1 = ETA * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
        c2 = ((1 - a_next) - c1 ** 2).sqrt()
        fresh = noise[step] if after > 0 else torch.zeros_like(x)
        x = x0 * a_next.sqrt() + c1 * fresh + c2 * eps
    return x.squeeze(1).unflatten(0, (-1, r)).mean(dim=1)


# -- the released weights ------------------------------------------------------------------------------------------
# official name (after CompoDiffModel's "model." and CompoDiff's "net.") -> this module's
_RENAMES = (
    (r"^to_text_embeds\.0\.", "text_in."),
    (r"^to_time_embeds\.0\.1\.", "time_mlp."),
    (r"^to_mask_embeds\.1\.", "mask_mlp."),
    (r"^transformer\.rel_pos_bias\.relative_attention_bias\.", "rel_bias."),
    (r"^transformer\.layers\.(\d+)\.0\.", r"layers.\1.attn."),
    (r"^transformer\.layers\.(\d+)\.1\.", r"layers.\1.cross."),
    (r"^transformer\.layers\.(\d+)\.2\.0\.", r"layers.\1.ff.norm."),
    (r"^transformer\.layers\.(\d+)\.2\.1\.", r"layers.\1.ff.up."),
    (r"^transformer\.layers\.(\d+)\.2\.5\.", r"layers.\1.ff.down."),  # [norm, up, SwiGLU, Identity, Dropout, down]
    (r"^transformer\.norm\.", "norm_out."),
    (r"^transformer\.project_out\.", "project_out."),
)


def own_names(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The denoiser's tensors under this module's names, from a state dict in the official layout (as
    ``CompoDiffModel.save_pretrained`` writes it: ``model.net.*`` and ``model.noise_scheduler.*``), and what the
    file says beyond them (the rotary frequencies, the schedule's betas), checked by :func:`build`."""
    net: dict[str, torch.Tensor] = {}
    extra: dict = {}
    for name, value in tensors.items():
        name = name.removeprefix("module.").removeprefix("model.")
        if name.startswith("noise_scheduler."):
            extra[name.removeprefix("noise_scheduler.")] = value
            continue
        if not name.startswith("net."):
            raise CheckpointError(f"checkpoint {source} holds '{name}', not a CompoDiff denoiser's tensor (expected "
                                  "model.net.* as CompoDiffModel saves them)")
        name = name.removeprefix("net.")
        if name.endswith("rotary_emb.freqs"):
            extra.setdefault("rotary", []).append(value)
            continue
        for pattern, replacement in _RENAMES:
            renamed = re.sub(pattern, replacement, name)
            if renamed != name:
                name = renamed
                break
        net[name] = value
    return net, extra


def architecture_of(net: dict[str, torch.Tensor], extra: dict, source: str) -> Architecture:
    """The sizes the tensors imply (CompoDiffConfig's embed_dim, model_depth, model_heads, model_dim, timesteps)."""
    try:
        dim, text_width = net["text_in.weight"].shape
        dim_head = net["layers.0.attn.null_kv"].shape[1]
        heads = net["layers.0.attn.to_q.weight"].shape[0] // dim_head
        cross_heads = net["layers.0.cross.to_q.weight"].shape[0] // dim_head
        depth = len({k.split(".")[1] for k in net if k.startswith("layers.")})
        ff_mult = net["layers.0.ff.up.weight"].shape[0] // (2 * dim)
        mask_side = math.isqrt(net["mask_mlp.net.0.0.weight"].shape[1])
    except (KeyError, IndexError, ValueError):
        raise CheckpointError(f"checkpoint {source} is not a CompoDiff denoiser (text_embeds, layers.0 or the "
                              "mask embedding missing)") from None
    betas = extra.get("betas")
    timesteps = int(betas.shape[0]) if isinstance(betas, torch.Tensor) else 1000
    return Architecture(dim=int(dim), depth=depth, heads=int(heads), dim_head=int(dim_head),
                        cross_heads=int(cross_heads), text_width=int(text_width), ff_mult=int(ff_mult),
                        mask_side=mask_side, timesteps=timesteps)


def build(tensors: dict[str, torch.Tensor], source: str) -> tuple[Denoiser, Schedule]:
    """The denoiser (eval mode, float32) and its schedule from the released state dict; CheckpointError when the
    file is not CompoDiff's (names, shapes, a rotary or noise schedule other than the cosine one built here)."""
    from cirbench.checkpoints import load_module_weights

    net_tensors, extra = own_names(tensors, source)
    arch = architecture_of(net_tensors, extra, source)
    net = Denoiser(arch)
    load_module_weights(net, net_tensors, source)
    schedule = Schedule(arch.timesteps)
    expected = rotary_frequencies(arch.dim_head)
    if any(f.shape != expected.shape or not torch.allclose(f.float(), expected, rtol=1e-5, atol=1e-7)
           for f in extra.get("rotary", [])):
        raise CheckpointError(f"checkpoint {source}: its rotary frequencies are not RotaryEmbedding(dim="
                              f"{2 * len(expected)})'s; not a CompoDiff denoiser this port reproduces")
    betas = extra.get("betas")
    if isinstance(betas, torch.Tensor) and not torch.allclose(betas.double(), schedule.betas, atol=1e-6):
        raise CheckpointError(f"checkpoint {source}: its noise schedule is not the cosine schedule CompoDiff "
                              "samples with")
    return net.eval(), schedule
