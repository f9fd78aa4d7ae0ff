"""A small pure-torch LLaMA-style causal LM: the architecture of the LLM code paths without
``transformers`` (tests, examples, the embedded default model).

Same module layout and names as Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model.norm``, ``lm_head``), so targets written for one fit the
other: pre-norm blocks with RMSNorm, rotary position embeddings computed once per forward and
passed to every block as a keyword argument, grouped-query attention and a SwiGLU MLP::

    >>> import torch
    >>> from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
    >>> model = TinyLlama(TinyLlamaConfig(vocab_size=50, hidden_size=32, num_layers=2))
    >>> out = model(torch.randint(0, 50, (2, 7)), labels=torch.randint(0, 50, (2, 7)))
    >>> out.logits.shape, out.loss.dim()
    (torch.Size([2, 7, 50]), 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class TinyLlamaConfig:
    vocab_size: int = 97
    hidden_size: int = 64
    intermediate_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2        # grouped-query attention: 2 query heads per key/value head
    rope_theta: float = 10000.0
    eps: float = 1e-6


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.heads, self.kv_heads = c.num_heads, c.num_kv_heads
        self.head_dim = c.hidden_size // c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        b, t, _ = x.shape
        # (b, t, h*d) -> (b, h, t, d)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings  # (t, d) each
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.mlp = MLP(c)

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyBackbone(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.eps)

    def rotary(self, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
        d = self.config.hidden_size // self.config.num_heads
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)  # (t, d)
        return ang.cos(), ang.sin()

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed_tokens(input_ids)
        pe = self.rotary(input_ids.shape[1], input_ids.device)
        for layer in self.layers:
            h = layer(h, position_embeddings=pe)
        return self.norm(h)


class TinyLlama(nn.Module):
    """``forward(input_ids, labels=None)`` -> :class:`CausalLMOutput` (next-token loss when labels)."""

    def __init__(self, config: TinyLlamaConfig | None = None):
        super().__init__()
        self.config = config or TinyLlamaConfig()
        self.model = TinyBackbone(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> CausalLMOutput:
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutput(logits, loss)
