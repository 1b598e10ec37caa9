"""CompoDiff: the port against a transcription of the official code, its files, errors, and a run through the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from generation_models import write_tiny_clip_text
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.errors import CheckpointError
from cirbench.types import Query

TEXT_WIDTH = 24
SIZES = {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16}  # the tiny backbone's 32-d embeddings


# -- the official code, transcribed (compodiff/models.py; rotary_embedding_torch for its RotaryEmbedding) ---------
class OfficialLayerNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-5, fp16_eps=1e-3, stable=False):
        super().__init__()
        self.eps, self.fp16_eps, self.stable = eps, fp16_eps, stable
        self.g = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        eps = self.eps if x.dtype == torch.float32 else self.fp16_eps
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        var = torch.var(x, dim=-1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=-1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class OfficialMLP(torch.nn.Module):
    def __init__(self, dim_in, dim_out, *, expansion_factor=2.0, depth=2):
        super().__init__()
        hidden = int(expansion_factor * dim_out)
        layers = [torch.nn.Sequential(torch.nn.Linear(dim_in, hidden), torch.nn.SiLU(), torch.nn.Identity())]
        for _ in range(depth - 1):
            layers.append(torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Identity()))
        layers.append(torch.nn.Linear(hidden, dim_out))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.float())


class OfficialSinusoidalPosEmb(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half_dim = self.dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, dtype=x.dtype) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1).type(x.dtype)


class Rearrange(torch.nn.Module):  # einops' layer, for the positions it takes in the official Sequentials
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def official_rotate_half(x):
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def official_apply_rotary_emb(freqs, t, start_index=0, scale=1.0, seq_dim=-2):
    if t.ndim == 3:
        freqs = freqs[-t.shape[seq_dim]:].to(t)
    rot_dim = freqs.shape[-1]
    end_index = start_index + rot_dim
    t_left, t, t_right = t[..., :start_index], t[..., start_index:end_index], t[..., end_index:]
    t = (t * freqs.cos() * scale) + (official_rotate_half(t) * freqs.sin() * scale)
    return torch.cat((t_left, t, t_right), dim=-1)


class OfficialRotaryEmbedding(torch.nn.Module):
    def __init__(self, dim, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        self.freqs = torch.nn.Parameter(freqs, requires_grad=False)

    def rotate_queries_or_keys(self, t, seq_dim=-2):
        seq_len = t.shape[seq_dim]
        pos = torch.arange(seq_len, dtype=t.dtype)
        freqs = torch.einsum("..., f -> ... f", pos.type(self.freqs.dtype), self.freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)
        return official_apply_rotary_emb(freqs, t, seq_dim=seq_dim)


class OfficialRelPosBias(torch.nn.Module):
    def __init__(self, heads=8, num_buckets=32, max_distance=128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = torch.nn.Embedding(num_buckets, heads)

    @staticmethod
    def _relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
        n = -relative_position
        n = torch.max(n, torch.zeros_like(n))
        max_exact = num_buckets // 2
        is_small = n < max_exact
        val_if_large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                                    * (num_buckets - max_exact)).long()
        val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
        return torch.where(is_small, n, val_if_large)

    def forward(self, i, j):
        q_pos = torch.arange(i, dtype=torch.long)
        k_pos = torch.arange(j, dtype=torch.long)
        rel_pos = k_pos[None, :] - q_pos[:, None]
        rp_bucket = self._relative_position_bucket(rel_pos, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(rp_bucket).permute(2, 0, 1)


class OfficialAttention(torch.nn.Module):
    def __init__(self, dim, *, dim_head=64, heads=8, rotary_emb=None, cosine_sim=True, cosine_sim_scale=16):
        super().__init__()
        self.scale = cosine_sim_scale if cosine_sim else (dim_head ** -0.5)
        self.cosine_sim, self.heads = cosine_sim, heads
        inner_dim = dim_head * heads
        self.norm = OfficialLayerNorm(dim)
        self.dropout = torch.nn.Dropout(0.0)
        self.null_kv = torch.nn.Parameter(torch.randn(2, dim_head))
        self.to_q = torch.nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = torch.nn.Linear(dim, dim_head * 2, bias=False)
        self.rotary_emb = rotary_emb
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner_dim, dim, bias=False), OfficialLayerNorm(dim))

    def forward(self, x, mask=None, attn_bias=None):
        b, n = x.shape[:2]
        x = self.norm(x)
        q, k, v = (self.to_q(x), *self.to_kv(x).chunk(2, dim=-1))
        q = q.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
        q = q * self.scale
        if self.rotary_emb is not None:
            q, k = map(self.rotary_emb.rotate_queries_or_keys, (q, k))
        nk, nv = (t.reshape(1, 1, -1).expand(b, 1, -1) for t in self.null_kv.unbind(dim=-2))
        k = torch.cat((nk, k), dim=-2)
        v = torch.cat((nv, v), dim=-2)
        if self.cosine_sim:
            q, k = map(lambda t: F.normalize(t, dim=-1), (q, k))
        q, k = map(lambda t: t * math.sqrt(self.scale), (q, k))
        sim = torch.einsum("b h i d, b j d -> b h i j", q, k)
        if attn_bias is not None:
            sim = sim + attn_bias
        attn = sim.softmax(dim=-1, dtype=torch.float32).type(sim.dtype)
        out = torch.einsum("b h i j, b j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


class OfficialCrossAttention(torch.nn.Module):
    def __init__(self, dim, *, context_dim=None, dim_head=64, heads=8, cosine_sim=False, cosine_sim_scale=16):
        super().__init__()
        self.cosine_sim = cosine_sim
        self.scale = cosine_sim_scale if cosine_sim else (dim_head ** -0.5)
        self.heads = heads
        inner_dim = dim_head * heads
        context_dim = context_dim or dim
        self.norm = OfficialLayerNorm(dim)
        self.norm_context = torch.nn.Identity()
        self.dropout = torch.nn.Dropout(0.0)
        self.null_kv = torch.nn.Parameter(torch.randn(2, dim_head))
        self.to_q = torch.nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = torch.nn.Linear(context_dim, inner_dim * 2, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner_dim, dim, bias=False), OfficialLayerNorm(dim))

    def forward(self, x, context, mask=None):
        b = x.shape[0]
        x = self.norm(x)
        context = self.norm_context(context)
        q, k, v = (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        nk, nv = (t.reshape(1, 1, 1, -1).expand(b, self.heads, 1, -1) for t in self.null_kv.unbind(dim=-2))
        k = torch.cat((nk, k), dim=-2)
        v = torch.cat((nv, v), dim=-2)
        q, k = map(lambda t: t * math.sqrt(self.scale), (q, k))
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k)
        attn = sim.softmax(dim=-1, dtype=torch.float32).type(sim.dtype)
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(b, out.shape[2], -1)
        return self.to_out(out)


class OfficialSwiGLU(torch.nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def official_feed_forward(dim, mult=4):
    inner_dim = int(mult * dim)
    return torch.nn.Sequential(OfficialLayerNorm(dim), torch.nn.Linear(dim, inner_dim * 2, bias=False),
                               OfficialSwiGLU(), torch.nn.Identity(), torch.nn.Dropout(0.0),
                               torch.nn.Linear(inner_dim, dim, bias=False))


class OfficialCrossTransformer(torch.nn.Module):
    def __init__(self, *, dim, depth, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.init_norm = torch.nn.Identity()
        self.rel_pos_bias = OfficialRelPosBias(heads=heads)
        rotary_emb = OfficialRotaryEmbedding(dim=min(32, dim_head))
        self.layers = torch.nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(torch.nn.ModuleList([
                OfficialAttention(dim=dim, dim_head=dim_head, heads=heads, rotary_emb=rotary_emb),
                OfficialCrossAttention(dim=dim, dim_head=dim_head),  # heads: the default 8, as officially
                official_feed_forward(dim=dim, mult=ff_mult),
            ]))
        self.norm = OfficialLayerNorm(dim, stable=True)
        self.project_out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, context, mask=None):
        n = x.shape[1]
        x = self.init_norm(x)
        attn_bias = self.rel_pos_bias(n, n + 1)
        for attn, cross_attn, ff in self.layers:
            x = attn(x, attn_bias=attn_bias) + x
            x = cross_attn(x, context, mask) + x
            x = ff(x) + x
        return self.project_out(self.norm(x))


class OfficialCompoDiffNetwork(torch.nn.Module):
    def __init__(self, dim, text_width, **kwargs):
        super().__init__()
        self.dim = dim
        self.to_text_embeds = torch.nn.Sequential(torch.nn.Linear(text_width, self.dim))  # 1280 officially
        self.to_time_embeds = torch.nn.Sequential(
            torch.nn.Sequential(OfficialSinusoidalPosEmb(dim), OfficialMLP(dim, dim)),
            Rearrange(lambda t: t.reshape(t.shape[0], 1, -1)))
        self.to_mask_embeds = torch.nn.Sequential(Rearrange(lambda t: t.flatten(1)), OfficialMLP(4096, dim),
                                                  Rearrange(lambda t: t.reshape(t.shape[0], 1, -1)))
        self.transformer = OfficialCrossTransformer(dim=dim, **kwargs)

    def forward_with_cond_scale(self, image_embed, image_cond, text_cond, input_mask, diffusion_timesteps,
                                text_cond_uc, cond_scale=1.0):
        image_embed = torch.cat([image_embed] * 3)
        image_cond = torch.cat([image_cond, image_cond, torch.zeros_like(image_cond)])
        text_cond = torch.cat([text_cond, text_cond_uc, text_cond_uc])
        input_mask = torch.cat([input_mask] * 3)
        diffusion_timesteps = torch.cat([diffusion_timesteps] * 3)
        logits, null_text_logits, null_all_logits = self.forward(image_embed, image_cond, text_cond, input_mask,
                                                                 diffusion_timesteps).chunk(3)
        return (null_all_logits + (logits - null_text_logits) * cond_scale[1]
                + (null_text_logits - null_all_logits) * cond_scale[0])

    def forward(self, image_embed, image_cond, text_cond, input_mask, diffusion_timesteps):
        text_cond = self.to_text_embeds(text_cond)
        diffusion_timesteps = diffusion_timesteps.type(image_embed.dtype)
        time_embed = self.to_time_embeds(diffusion_timesteps)
        mask_embed = self.to_mask_embeds(input_mask)
        tokens = torch.cat((image_embed, time_embed), dim=-2)
        context_embed = torch.cat([text_cond, image_cond, mask_embed], dim=1)
        tokens = self.transformer(tokens, context=context_embed)
        return tokens[..., :1, :]


class OfficialNoiseScheduler(torch.nn.Module):
    def __init__(self, timesteps=1000):
        super().__init__()
        steps = timesteps + 1
        x = torch.linspace(0, timesteps, steps, dtype=torch.float64)
        alphas_cumprod = torch.cos(((x / timesteps) + 0.008) / (1 + 0.008) * torch.pi * 0.5) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = torch.clip(1 - (alphas_cumprod[1:] / alphas_cumprod[:-1]), 0, 0.999)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, axis=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        self.num_timesteps = int(betas.shape[0])

        def register_buffer(name, val):
            self.register_buffer(name, val.to(torch.float32))

        register_buffer("betas", betas)
        register_buffer("alphas_cumprod", alphas_cumprod)
        register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        register_buffer("sqrt_alphas_cumprod", torch.sqrt(alphas_cumprod))
        register_buffer("sqrt_recip_alphas_cumprod", torch.sqrt(1.0 / alphas_cumprod))
        register_buffer("sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / alphas_cumprod - 1))

    def predict_noise_from_start(self, x_t, t, x0):
        def extract(a):
            return a.gather(-1, t).reshape(t.shape[0], 1, 1)

        return (extract(self.sqrt_recip_alphas_cumprod) * x_t - x0) / extract(self.sqrt_recipm1_alphas_cumprod)


class OfficialCompoDiff(torch.nn.Module):
    def __init__(self, net, image_embed_dim, timesteps=1000):
        super().__init__()
        self.noise_scheduler = OfficialNoiseScheduler(timesteps)
        self.net = net
        self.image_embed_dim = image_embed_dim
        self.image_embed_scale = 1.0

    @torch.no_grad()
    def p_sample_loop_ddim(self, shape, image_cond, text_cond, negative_text_cond, input_mask, timesteps, draws,
                           eta=1.0, cond_scale=1.0):
        """The official loop; ``draws`` stands in for its ``torch.randn(shape)`` and ``torch.randn_like``."""
        batch, alphas = shape[0], self.noise_scheduler.alphas_cumprod_prev
        total_timesteps = self.noise_scheduler.num_timesteps
        times = torch.linspace(-1.0, total_timesteps, steps=timesteps + 1)[:-1]
        times = list(reversed(times.int().tolist()))
        time_pairs = list(zip(times[:-1], times[1:], strict=True))
        image_embed = next(draws)
        for time, time_next in time_pairs:
            alpha = alphas[time]
            alpha_next = alphas[time_next]
            time_cond = torch.full((batch,), time, dtype=torch.long)
            pred = self.net.forward_with_cond_scale(image_embed, image_cond, text_cond, input_mask, time_cond,
                                                    text_cond_uc=negative_text_cond, cond_scale=cond_scale)
            x_start = pred
            pred_noise = self.noise_scheduler.predict_noise_from_start(image_embed, t=time_cond, x0=x_start)
            step_noise = next(draws)  # drawn for every pair here (the port's order); used as officially
            if time_next < 0:
                image_embed = x_start
                continue
            c1 = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            c2 = ((1 - alpha_next) - torch.square(c1)).sqrt()
            noise = step_noise if time_next > 0 else 0.0
            image_embed = x_start * alpha_next.sqrt() + c1 * noise + c2 * pred_noise
        return image_embed

    @torch.no_grad()
    def sample(self, image_cond, text_cond, negative_text_cond, input_mask, draws, num_samples_per_batch=4,
               cond_scale=1.0, timesteps=None):
        r = num_samples_per_batch
        image_cond, text_cond, input_mask, negative_text_cond = (
            t.repeat_interleave(r, dim=0) for t in (image_cond, text_cond, input_mask, negative_text_cond))
        batch_size = text_cond.shape[0]
        image_embeds = self.p_sample_loop_ddim((batch_size, 1, self.image_embed_dim), image_cond, text_cond,
                                               negative_text_cond, input_mask, timesteps, draws,
                                               cond_scale=cond_scale)
        image_embeds = image_embeds / self.image_embed_scale
        return image_embeds.reshape(-1, r, image_embeds.shape[-1]).mean(dim=1)


class OfficialCompoDiffModel(torch.nn.Module):  # CompoDiffModel: the HF wrapper whose save_pretrained adds "model."
    def __init__(self, dim, depth, dim_head, heads, text_width, timesteps=1000):
        super().__init__()
        net = OfficialCompoDiffNetwork(dim, text_width, depth=depth, dim_head=dim_head, heads=heads)
        self.model = OfficialCompoDiff(net, dim, timesteps)


def official_text_cond(model, tokenizer, text, negative_text):
    """``CLIPHF.encode_texts`` of the text, and of the negative text with the text's attention mask (the demo's
    ``predict`` and the README's usage)."""
    enc = tokenizer(text=text, return_tensors="pt", padding="max_length", truncation=True)
    neg = tokenizer(text=negative_text, return_tensors="pt", padding="max_length", truncation=True)
    with torch.no_grad():
        text_cond = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.float()
        negative = model(input_ids=neg["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.float()
    return text_cond, negative


# -- fixtures ----------------------------------------------------------------------------------------------------
def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (the gains and null keys too), large enough that each part matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("rotary_emb.freqs"):
                continue
            scale = 0.5 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.4
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith(".g") else 0.0))
    return module.eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("compodiff")
    official = randomised(OfficialCompoDiffModel(text_width=TEXT_WIDTH, **SIZES), 1)
    torch.save(official.state_dict(), root / "pytorch_model.bin")
    text = write_tiny_clip_text(root / "text-encoder", width=TEXT_WIDTH)
    return SimpleNamespace(root=root, official=official, weights=root / "pytorch_model.bin", text=text,
                           options={"checkpoint": str(root / "pytorch_model.bin"), "text_encoder": str(text)})


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


def port_draws(ids: list[str], seed: int, pairs: int, samples: int, dim: int) -> list[torch.Tensor]:
    """The noise the port draws: per query, from its own generator, the initial draw then one per step."""
    from cirbench.util import keyed_seed

    per_query = [torch.randn((1 + pairs) * samples, 1, dim, generator=torch.Generator().manual_seed(
        keyed_seed(seed, q))).unflatten(0, (1 + pairs, samples)) for q in ids]
    return list(torch.stack(per_query, dim=1).flatten(1, 2))


def test_the_denoiser_is_the_official_network(released):
    """The released state dict, loaded under the port's names, gives CompoDiffNetwork's output and its two-scale
    guidance at every timestep the sampler visits."""
    from cirbench.methods.compodiff.prior import build

    net, schedule = build(torch.load(released.weights), str(released.weights))
    official = released.official.model
    assert net.arch.record() == {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "cross_heads": 8,
                                 "text_width": TEXT_WIDTH,
                                 "ff_mult": 4, "mask_side": 64, "timesteps": 1000}
    gen = torch.Generator().manual_seed(3)
    b = 5
    x, image = torch.randn(b, 1, 32, generator=gen), torch.randn(b, 1, 32, generator=gen) * 3
    text, negative = torch.randn(b, 77, TEXT_WIDTH, generator=gen), torch.randn(b, 77, TEXT_WIDTH, generator=gen)
    mask = (torch.rand(b, 64, 64, generator=gen) > 0.7).float()
    t = torch.tensor([899, 499, 99, 0, 999])
    with torch.no_grad():
        torch.testing.assert_close(net(x, image, text, mask, t), official.net(x, image, text, mask, t),
                                   atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(net.guided(x, image, text, negative, mask, t, 1.5, 7.5),
                                   official.net.forward_with_cond_scale(x, image, text, mask, t, negative, (1.5, 7.5)),
                                   atol=1e-4, rtol=1e-4)
    # the final "stable" norm divides by each row's maximum first: a row of negative values turns over
    from cirbench.methods.compodiff.prior import GainNorm

    rows = torch.cat([torch.randn(3, 32, generator=gen), -torch.rand(2, 32, generator=gen) - 0.1])
    norm, theirs_norm = GainNorm(32, stable=True), OfficialLayerNorm(32, stable=True)
    torch.testing.assert_close(norm(rows), theirs_norm(rows))
    assert not torch.allclose(norm(rows)[3:], GainNorm(32)(rows)[3:], atol=0.1)
    ours = schedule
    theirs = official.noise_scheduler
    torch.testing.assert_close(ours.alphas_cumprod_prev, theirs.alphas_cumprod_prev, atol=0, rtol=0)
    torch.testing.assert_close(ours.sqrt_recip, theirs.sqrt_recip_alphas_cumprod, atol=0, rtol=0)
    assert ours.ddim_pairs(10)[0] == (899, 799) and ours.ddim_pairs(10)[-1] == (99, -1)
    assert len(ours.ddim_pairs(10)) == 9  # the network runs steps - 1 times, as officially


@pytest.mark.parametrize(("steps", "scales", "samples"), [(10, (1.5, 7.5), 2), (4, (0.0, 3.0), 1),
                                                           (25, (2.0, 1.0), 3)])
def test_sampling_is_the_official_ddim_loop(released, steps, scales, samples):
    from cirbench.methods.compodiff.prior import Guidance, build, sample
    from cirbench.util import keyed_seed

    net, schedule = build(torch.load(released.weights), str(released.weights))
    gen = torch.Generator().manual_seed(steps)
    ids = ["q0", "q1", "q2"]
    image = torch.randn(3, 1, 32, generator=gen) * 2
    text, negative = torch.randn(3, 77, TEXT_WIDTH, generator=gen), torch.randn(3, 77, TEXT_WIDTH, generator=gen)
    mask = torch.zeros(3, 64, 64)
    guidance = Guidance(steps=steps, image_scale=scales[0], text_scale=scales[1], samples=samples)
    ours = sample(net, schedule, image, text, negative, mask, guidance,
                  [torch.Generator().manual_seed(keyed_seed(7, q)) for q in ids])
    draws = iter(port_draws(ids, 7, len(schedule.ddim_pairs(steps)), samples, 32))
    expected = released.official.model.sample(image, text, negative, mask, draws, num_samples_per_batch=samples,
                                              cond_scale=scales, timesteps=steps)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert ours.shape == (3, 32) and bool(torch.isfinite(ours).all())


def test_a_denoiser_trained_on_another_number_of_timesteps_samples_on_its_own_schedule(tmp_path):
    """CompoDiffConfig's ``timesteps`` is read from the file's schedule (its betas), not assumed to be 1000."""
    from cirbench.methods.compodiff.prior import Guidance, build, sample
    from cirbench.util import keyed_seed

    official = randomised(OfficialCompoDiffModel(text_width=TEXT_WIDTH, timesteps=500, **SIZES), 2)
    torch.save(official.state_dict(), tmp_path / "short.bin")
    net, schedule = build(torch.load(tmp_path / "short.bin"), "short.bin")
    assert net.arch.timesteps == 500 and schedule.ddim_pairs(10)[0] == (449, 399)
    gen = torch.Generator().manual_seed(4)
    image, mask = torch.randn(2, 1, 32, generator=gen), torch.zeros(2, 64, 64)
    text, negative = torch.randn(2, 77, TEXT_WIDTH, generator=gen), torch.randn(2, 77, TEXT_WIDTH, generator=gen)
    ids = ["a", "b"]
    ours = sample(net, schedule, image, text, negative, mask, Guidance(steps=10, samples=1),
                  [torch.Generator().manual_seed(keyed_seed(0, q)) for q in ids])
    draws = iter(port_draws(ids, 0, len(schedule.ddim_pairs(10)), 1, 32))
    expected = official.model.sample(image, text, negative, mask, draws, num_samples_per_batch=1,
                                     cond_scale=(1.5, 7.5), timesteps=10)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_compose_is_the_official_query(backbone, released):
    """The method's query on CIRR-, FashionIQ- and a domain-conversion-shaped query is the official pipeline's:
    transformers' text tower (with the text's mask for the negative text), the denoised embedding, the source
    mix, normalised; and it does not depend on the batch the query is composed in."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from cirbench.methods._shared.textinv import raw_image_features
    from cirbench.methods.compodiff.model import CompoDiff

    options = {**released.options, "negative_text": "low quality", "source_weight": 0.2, "steps": 6}
    method = CompoDiff(backbone, options, "cirr")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    raw = raw_image_features(backbone, pixels)
    queries = [Query("a", "r", ("has two dogs on the grass",)), Query("b", "r", ("is longer.", "has stripes")),
               Query("c", "r", ("a sketch of the same object, at night and from far away in the rain",))]
    texts = ["has two dogs on the grass", "is longer and has stripes",
             "a sketch of the same object, at night and from far away in the rain"]
    ours = method.compose(raw, queries)
    tokenizer = CLIPTokenizer.from_pretrained(released.text)
    model = CLIPTextModel.from_pretrained(released.text).eval()
    steps = len(method.schedule.ddim_pairs(6))
    expected = []
    for i, (q, text) in enumerate(zip(queries, texts, strict=True)):
        text_cond, negative = official_text_cond(model, tokenizer, text, "low quality")
        image_cond = raw[i : i + 1].unsqueeze(1)
        draws = iter(port_draws([q.id], 0, steps, 2, 32))
        drawn = released.official.model.sample(image_cond, text_cond, negative, torch.zeros(1, 64, 64), draws,
                                               num_samples_per_batch=2, cond_scale=(1.5, 7.5), timesteps=6)
        mixed = 0.8 * drawn + 0.2 * image_cond[0]
        expected.append(mixed / mixed.norm(p=2, dim=-1, keepdim=True))
    torch.testing.assert_close(ours, torch.cat(expected), atol=1e-4, rtol=1e-4)
    one_by_one = torch.cat([method.compose(raw[i : i + 1], [q]) for i, q in enumerate(queries)])
    torch.testing.assert_close(one_by_one, ours, atol=1e-5, rtol=1e-5)
    # the negative text's mask is the text's: a longer negative text is cut where the text ends
    tokens, mask = method.bundle["text"].tokens(["red", "a much longer negative text here"])
    assert mask.sum(1).tolist() == [3, 8]
    # the seed moves the draw, the source weight pulls the query to the reference
    reseeded = CompoDiff(backbone, {**options, "sampling_seed": 1}, "cirr").compose(raw, queries)
    assert not torch.allclose(reseeded, ours, atol=1e-3)
    source = CompoDiff(backbone, {**options, "source_weight": 1.0}, "cirr").compose(raw, queries)
    torch.testing.assert_close(source, F.normalize(raw, dim=-1))


def test_wrong_files_say_what_is_wrong(tmp_path, backbone, released):
    from cirbench.methods.compodiff.model import CompoDiff

    def refused(match, **changes):
        with pytest.raises(CheckpointError, match=match) as info:
            CompoDiff(backbone, {**released.options, **changes}, "cirr")
        assert "\n" not in str(info.value)

    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    refused("junk.bin", checkpoint=str(tmp_path / "junk.bin"))
    refused("is not a file", checkpoint=str(tmp_path / "missing.bin"))
    refused("folder without model.safetensors or pytorch_model.bin", checkpoint=str(tmp_path))
    torch.save({"state_dict_img2text": {"layers.0.0.weight": torch.zeros(4, 4)}}, tmp_path / "p2w.pt")
    refused("not a CompoDiff denoiser's tensor", checkpoint=str(tmp_path / "p2w.pt"))
    state = released.official.state_dict()
    wide = OfficialCompoDiffModel(dim=48, depth=1, dim_head=16, heads=2, text_width=TEXT_WIDTH).state_dict()
    torch.save(wide, tmp_path / "wide.bin")
    refused("denoises 48-d image embeddings; this backbone's are 32-d", checkpoint=str(tmp_path / "wide.bin"))
    other_text = write_tiny_clip_text(tmp_path / "other-text", width=16)
    refused("gives 16-d hidden states; the denoiser .* reads 24-d", text_encoder=str(other_text))
    refused("cannot load CompoDiff's text encoder .*pass --text-encoder FOLDER", text_encoder=str(tmp_path / "nope"))
    linear = dict(state, **{"model.noise_scheduler.betas": torch.linspace(1e-4, 0.02, 1000)})
    torch.save(linear, tmp_path / "linear.bin")
    refused("not the cosine schedule", checkpoint=str(tmp_path / "linear.bin"))
    nan = dict(state)
    key = "model.net.transformer.project_out.weight"
    nan[key] = torch.full_like(nan[key], float("nan"))
    torch.save(nan, tmp_path / "nan.bin")
    refused("non-finite", checkpoint=str(tmp_path / "nan.bin"))
    # a save_pretrained folder with safetensors weights loads like the .bin
    from safetensors.torch import save_file

    folder = tmp_path / "saved"
    folder.mkdir()
    shared = [k for k in state if k.endswith("rotary_emb.freqs")][1:]  # save_pretrained keeps one shared tensor
    save_file({k: v.contiguous() for k, v in state.items() if k not in shared}, folder / "model.safetensors")
    method = CompoDiff(backbone, {**released.options, "checkpoint": str(folder)}, "cirr")
    assert method.info()["checkpoint"]["path"].endswith("model.safetensors")
    # beside a pytorch_model.bin, the safetensors file is the one read, as from_pretrained chooses
    (folder / "pytorch_model.bin").write_bytes(b"stale pickle")
    method = CompoDiff(backbone, {**released.options, "checkpoint": str(folder)}, "cirr")
    assert method.info()["checkpoint"]["path"].endswith("model.safetensors")


def test_released_weights_are_for_vit_l14_openai_and_fail_offline_in_one_line(monkeypatch, tmp_path):
    from cirbench.methods.compodiff.model import downloads, weights_file

    assert downloads({}, "ViT-L-14", "openai") == [
        ("CompoDiff-Aesthetic's weights",
         "hf-hub:navervision/CompoDiff-Aesthetic@9e26bd4a9305ca1b8572dd3a699dd4e3c14f5dcd/pytorch_model.bin"),
        ("CompoDiff's text encoder (CLIP-G/14's text tower)", "hf-model:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")]
    assert downloads({"checkpoint": "x.bin", "text_encoder": "t"}, "ViT-B-32", "openai") == [
        ("CompoDiff's text encoder (CLIP-G/14's text tower)", "hf-model:t")]
    with pytest.raises(CheckpointError, match="ViT-L-14/openai image embeddings; for ViT-B-32/openai pass "
                                              "--checkpoint FILE"):
        downloads({}, "ViT-B-32", "openai")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"CompoDiff-Aesthetic's weights.*pass --checkpoint PATH") as info:
        weights_file({}, SimpleNamespace(model_name="ViT-L-14", pretrained="openai"))
    assert "\n" not in str(info.value)


def test_run_and_sweep_through_the_cli_record_the_weights(tmp_path, tiny_config, toy_root, released):
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
              "--no-cache", "--quiet", "--output", str(tmp_path / "res"), "--checkpoint", str(released.weights),
              "--text-encoder", str(released.text), "--steps", "3"]
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "compodiff", "--source-weight", "0,0.5", *common])
        assert res.exit_code == 0, res.output
        results = sorted((tmp_path / "res").rglob("compodiff*.json"))
        assert len(results) == 2, results
        record = json.loads(results[0].read_text())
        info = record["method"]["info"]
        assert info["architecture"]["depth"] == 2 and len(info["checkpoint"]["sha256"]) == 64
        assert info["text_encoder"]["path"] == str(released.text) and len(info["text_encoder"]["config_sha256"]) == 64
        res = CliRunner().invoke(cli, ["run", "--method", "compodiff", *common, "--steps", "1"])
        assert res.exit_code == 2 and "below its minimum 2" in res.output
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"not a checkpoint")
        res = CliRunner().invoke(cli, ["run", "--method", "compodiff", *common, "--checkpoint", str(bad)])
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_compodiff_keeps_the_method_contract(tmp_path, released):
    """Deterministic, batch-independent (each query's noise its own), and sharing the backbone well
    (cirbench.testing.check_method)."""
    from cirbench.testing import ToyDatasetPlugin, check_method

    with registered(ToyDatasetPlugin(), "toy") as reg:
        (outcome,) = check_method("compodiff", tmp_path / "check", options={**released.options, "steps": 3},
                                  registry=reg)
    assert outcome.metrics and outcome.record["method"]["info"]["architecture"]["dim"] == 32
