"""gqe's model (docs/model.md) in PyTorch: a Llama-style decoder whose attention is GQA or GQE.

Parameter names are gqe's (Hugging Face Llama names plus the GQE layer's router and
q_shared), so `model.state_dict()` is exactly a checkpoint's tensor set. Every sequence starts at
position 0 and attends causally to itself; there is no KV cache here (training and scoring).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GQEConfig
from .errors import BadInput


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


def rope_cos_sin(T, head_dim, theta, device, dtype):
    """cos and sin [T, d_h/2] of positions 0..T-1. The angles are computed in float64: in float32
    position * inv_freq loses digits as the position grows."""
    half = head_dim // 2
    inv_freq = theta ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / head_dim)  # [d_h/2]
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, d_h/2]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, T, H, d_h]: element i pairs with i + d_h/2; cos, sin [T, d_h/2]."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, d_h/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_attention(q, k, v):
    """Softmax attention with the causal mask, scale 1/sqrt(d_h).

    q [..., T, d_h] against k, v [..., T, d_h] (broadcast over the leading dimensions), all from
    position 0: query t sees keys 0..t. Returns [..., T, d_h].
    """
    T, dh = q.shape[-2], q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)  # [..., T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # [T, T], key after query
    scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def select_experts(logits, k):
    """gqe's selection: in each group the k experts of largest router logit, in descending
    order, equal logits going to the lower expert index.

    logits [..., M] -> indices [..., k] (int64). torch.topk leaves the order of ties open, so each
    expert's rank is counted instead: the experts with a larger logit, plus the lower-indexed ones
    with an equal logit. A NaN logit ranks as -inf, so that the ranks stay a permutation; the NaN
    still reaches the output through the probabilities.
    """
    M = logits.shape[-1]
    key = torch.where(torch.isnan(logits), torch.full_like(logits, float("-inf")), logits)
    mine, other = key.unsqueeze(-1), key.unsqueeze(-2)  # [..., M, 1] expert m, [..., 1, M] expert m'
    lower = torch.ones(M, M, dtype=torch.bool, device=logits.device).tril(-1)  # [m, m']: m' < m
    before = (other > mine) | ((other == mine) & lower)  # [..., M, M]: m' ranks before m
    rank = before.sum(dim=-1)  # [..., M], a permutation of 0..M-1
    experts = torch.arange(M, device=logits.device).expand_as(rank)
    order = torch.empty_like(rank).scatter_(-1, rank, experts)  # [..., M]: order[rank[m]] = m
    return order[..., :k]


def load_balancing_loss(probs, indices, load_reduce=None):
    """L_aux = mean_g [ M * sum_m f[g, m] * P[g, m] ] over the tokens of probs [B, T, G, M].

    f, the fraction of tokens whose kept set (indices [B, T, G, k]) holds m, is a count and
    carries no gradient; load_reduce, when given, replaces it by its mean over processes (see
    train.py). P, the mean probability, carries the gradient.
    """
    M = probs.shape[-1]
    kept = torch.zeros_like(probs).scatter_(-1, indices, 1.0)  # [B, T, G, M]
    f = kept.mean(dim=(0, 1))  # [G, M]
    if load_reduce is not None:
        f = load_reduce(f)
    P = probs.mean(dim=(0, 1))  # [G, M]
    return (M * (f * P).sum(dim=-1)).mean()


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):  # x [..., d]
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, d, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(d, intermediate, bias=False)
        self.up_proj = nn.Linear(d, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GQAAttention(nn.Module):
    """Dense grouped-query attention: query head e = g*M + m reads KV head g."""

    def __init__(self, c):
        super().__init__()
        d, N, G, dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.G, self.M, self.dh = G, N // G, dh
        self.q_proj = nn.Linear(d, N * dh, bias=False)
        self.k_proj = nn.Linear(d, G * dh, bias=False)
        self.v_proj = nn.Linear(d, G * dh, bias=False)
        self.o_proj = nn.Linear(N * dh, d, bias=False)

    def forward(self, x, cos, sin):  # x [B, T, d]
        B, T, _ = x.shape
        G, M, dh = self.G, self.M, self.dh
        q = apply_rope(self.q_proj(x).view(B, T, G * M, dh), cos, sin)  # [B, T, N, d_h]
        k = apply_rope(self.k_proj(x).view(B, T, G, dh), cos, sin)  # [B, T, G, d_h]
        v = self.v_proj(x).view(B, T, G, dh)  # [B, T, G, d_h]
        q = q.view(B, T, G, M, dh).permute(0, 2, 3, 1, 4)  # [B, G, M, T, d_h]
        k = k.permute(0, 2, 1, 3).unsqueeze(2)  # [B, G, 1, T, d_h]: shared by the group's M heads
        v = v.permute(0, 2, 1, 3).unsqueeze(2)  # [B, G, 1, T, d_h]
        out = causal_attention(q, k, v)  # [B, G, M, T, d_h]
        out = out.permute(0, 3, 1, 2, 4).reshape(B, T, G * M * dh)  # [B, T, N*d_h], head order
        return self.o_proj(out)


class GQEAttention(nn.Module):
    """Grouped Query Experts attention, variants gqe, hard_concat and weighted_concat.

    After each forward: last_router_probs [B, T, G, M], last_expert_indices [B, T, G, k] (the
    kept experts in slot order) and last_aux_loss (this layer's L_aux, with its gradient).
    """

    def __init__(self, c):
        super().__init__()
        d, N, G, dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.G, self.M, self.k, self.dh, self.variant = G, N // G, c.gqe_top_k, dh, c.gqe_variant
        self.q_proj = nn.Linear(d, N * dh, bias=False)
        self.k_proj = nn.Linear(d, G * dh, bias=False)
        self.v_proj = nn.Linear(d, G * dh, bias=False)
        self.router = nn.Linear(d, N, bias=False)  # G*M logits
        if self.variant == "gqe":
            self.q_shared = nn.Linear(d, dh, bias=False)
        self.o_proj = nn.Linear(c.num_output_slots * dh, d, bias=False)
        self.load_reduce = None
        self.last_router_probs = self.last_expert_indices = self.last_aux_loss = None

    def forward(self, x, cos, sin):  # x [B, T, d]
        B, T, _ = x.shape
        G, M, k, dh = self.G, self.M, self.k, self.dh
        logits = self.router(x).view(B, T, G, M)  # [B, T, G, M]
        probs = torch.softmax(logits, dim=-1)  # [B, T, G, M], per group
        with torch.no_grad():
            idx = select_experts(logits, k)  # [B, T, G, k]
        slot_p = torch.gather(probs, -1, idx)  # [B, T, G, k]: p of each kept expert

        q = apply_rope(self.q_proj(x).view(B, T, G * M, dh), cos, sin).view(B, T, G, M, dh)
        key = apply_rope(self.k_proj(x).view(B, T, G, dh), cos, sin)  # [B, T, G, d_h]
        val = self.v_proj(x).view(B, T, G, dh)  # [B, T, G, d_h]
        # Slot (g, j) is one attention head whose query row t is the expert token t chose.
        q_kept = torch.gather(q, 3, idx.unsqueeze(-1).expand(B, T, G, k, dh))  # [B, T, G, k, d_h]
        slots = causal_attention(q_kept.permute(0, 2, 3, 1, 4),  # [B, G, k, T, d_h]
                                 key.permute(0, 2, 1, 3).unsqueeze(2),  # [B, G, 1, T, d_h]
                                 val.permute(0, 2, 1, 3).unsqueeze(2))
        slots = slots.permute(0, 3, 1, 2, 4)  # [B, T, G, k, d_h]

        if self.variant == "weighted_concat":
            parts = [(slots * slot_p.unsqueeze(-1)).reshape(B, T, G * k * dh)]
        else:
            parts = [slots.reshape(B, T, G * k * dh)]  # slot order (g, j)
        if self.variant == "gqe":
            # Renormalised across all groups: the router's path to the language-model loss.
            w = slot_p / slot_p.sum(dim=(2, 3), keepdim=True).clamp_min(1e-9)  # [B, T, G, k]
            parts.append((slots * w.unsqueeze(-1)).sum(dim=(2, 3)))  # [B, T, d_h]
            q_sh = apply_rope(self.q_shared(x).view(B, T, 1, dh), cos, sin)  # [B, T, 1, d_h]
            shared = causal_attention(q_sh.transpose(1, 2),  # [B, 1, T, d_h]
                                      key.mean(dim=2).unsqueeze(1),  # [B, 1, T, d_h], mean over groups
                                      val.mean(dim=2).unsqueeze(1))
            parts.append(shared.squeeze(1))  # [B, T, d_h]

        self.last_router_probs = probs.detach()
        self.last_expert_indices = idx
        self.last_aux_loss = load_balancing_loss(probs, idx, self.load_reduce)
        return self.o_proj(torch.cat(parts, dim=-1))  # [B, T, S*d_h] -> [B, T, d]


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = GQEAttention(c) if c.is_gqe else GQAAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def forward(self, h, cos, sin):  # h [B, T, d]
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class GQEModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class GQEForCausalLM(nn.Module):
    """GQEForCausalLM(config): model(input_ids [B, T] int64) -> logits [B, T, V].

    After a call, `aux_loss` is the load-balancing loss of that call summed over layers (a
    tensor with its gradient; zero for GQA); `expert_indices` and `router_probs` list each GQE
    layer's choices [B, T, G, k] and probabilities [B, T, G, M].
    """

    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = GQEConfig(**config)
        if not isinstance(config, GQEConfig):
            raise BadInput(f"config is a {type(config).__name__}; expected a GQEConfig or a dict of config.json's keys")
        self.config = config
        self.model = GQEModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.aux_loss = None
        self.expert_indices, self.router_probs = [], []
        self._rope = None  # (T, device, dtype, cos, sin) of the last call
        self.reset_parameters()

    def reset_parameters(self):
        """gqe-train's initialisation: router zeros, every other matrix
        Xavier-uniform, norms ones; token embeddings N(0, 1) like nn.Embedding's, Xavier-uniform
        when tied (they then produce the logits too)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.dim() == 1:
                    p.fill_(1.0)
                elif name.endswith(".router.weight"):
                    p.zero_()
                elif name == "model.embed_tokens.weight" and not self.config.tie_word_embeddings:
                    p.normal_(0.0, 1.0)
                else:
                    nn.init.xavier_uniform_(p)

    def set_load_reduce(self, fn):
        """fn(f [G, M]) -> f averaged over processes, used by every GQE layer's aux loss."""
        for layer in self.model.layers:
            if isinstance(layer.self_attn, GQEAttention):
                layer.self_attn.load_reduce = fn

    def _rope_tables(self, T, device, dtype):
        if self._rope is None or self._rope[:3] != (T, device, dtype):
            c = self.config
            self._rope = (T, device, dtype) + rope_cos_sin(T, c.head_dim, c.rope_theta, device, dtype)
        return self._rope[3], self._rope[4]

    def forward(self, input_ids):
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2:
            raise BadInput("input_ids must be an int64 tensor [B, T]")
        B, T = input_ids.shape
        if B == 0:
            raise BadInput("a batch of 0 sequences; expected at least 1")
        if T == 0 or T > c.max_position_embeddings:
            raise BadInput(f"sequence length {T}; expected 1 to max_position_embeddings = {c.max_position_embeddings}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise BadInput(f"token id out of range; expected 0 to {c.vocab_size - 1}")
        h = self.model.embed_tokens(input_ids)  # [B, T, d]
        cos, sin = self._rope_tables(T, h.device, h.dtype)  # [T, d_h/2]
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.model.norm(h)
        head = self.model.embed_tokens.weight if c.tie_word_embeddings else self.lm_head.weight  # [V, d]

        gqe_layers = [l.self_attn for l in self.model.layers if isinstance(l.self_attn, GQEAttention)]
        self.expert_indices = [a.last_expert_indices for a in gqe_layers]
        self.router_probs = [a.last_router_probs for a in gqe_layers]
        self.aux_loss = (torch.stack([a.last_aux_loss for a in gqe_layers]).sum() if gqe_layers
                         else h.new_zeros(()))
        return F.linear(h, head)  # [B, T, V]
