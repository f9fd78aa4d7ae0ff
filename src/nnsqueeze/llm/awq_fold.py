"""AWQ scales folded into a float LLaMA model: the function is unchanged, the weights are ``W * s``.

The ``awq`` step's ``fold: true`` (AWQ as a transform, then another quantizer such as ``gptq``, as
llm-compressor's ``AWQModifier`` + ``GPTQModifier`` do): each targeted Linear's columns are
multiplied by its AWQ scales ``s`` and the ``1 / s`` moves into the op that produces its input:

- ``q/k/v_proj``: ``input_layernorm.weight / s``; ``gate/up_proj``: ``post_attention_layernorm.weight / s``
  (every Linear reading the norm gets the same ``s``, targeted or not: an untargeted one stays float);
- ``down_proj``: rows of ``up_proj``; ``o_proj``: rows of ``v_proj`` (under grouped-query attention
  ``s`` must agree on the query heads that share a kv head: the awq step's ``share_scales`` gives that).

Only float ``nn.Linear`` layers and RMSNorm weights are rewritten (a packed or quantized one is a
ModelError). The model's outputs change by float rounding only::

    >>> import torch
    >>> from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
    >>> from nnsqueeze.llm.awq_fold import fold_scales_
    >>> _ = torch.manual_seed(0)
    >>> model = TinyLlama(TinyLlamaConfig()).eval()
    >>> x = torch.randint(0, 97, (1, 12))
    >>> ref = model(x).logits
    >>> s = torch.linspace(0.5, 2.0, 64)
    >>> fold_scales_(model, {f"model.layers.0.self_attn.{p}_proj": s for p in "qkv"}, model.config)
    >>> bool(torch.allclose(model(x).logits, ref, atol=1e-4))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError

NORMS = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
         "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
         "mlp.up_proj": "post_attention_layernorm"}
ROWS = {"mlp.down_proj": "mlp.up_proj", "self_attn.o_proj": "self_attn.v_proj"}
FIX = "use `awq: {..., share_scales: true, fold: true}` on a LLaMA-layout model, or fold: false"


def fold_role(name: str) -> tuple[str, str] | None:
    """(block prefix, role) of a projection whose input scale folds into ``NORMS``/``ROWS``, else None."""
    for role in (*NORMS, *ROWS):
        if name.endswith("." + role):
            return name[: -len(role) - 1], role
    return None


def _role(name: str) -> tuple[str, str]:
    found = fold_role(name)
    if found is not None:
        return found
    raise ModelError(name, "has AWQ scales and no op before it to fold them into (LLaMA layout: q/k/v, gate/up, "
                     "down, o projections)", fix="ignore this layer in awq, or use fold: false")


def _float_linear(model: nn.Module, name: str) -> nn.Linear:
    mod = model.get_submodule(name)
    if type(mod) is not nn.Linear:
        raise ModelError(name, f"is a {type(mod).__name__}: AWQ scales fold only into float nn.Linear layers",
                         fix="run awq with fold: true before any step that quantizes these layers")
    return mod


def attention_heads(config: Any) -> tuple[int | None, int | None]:
    """``(query heads, kv heads)`` from a transformers config or a :class:`~nnsqueeze.llm.tiny.TinyLlamaConfig`."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    return heads, kv


@torch.no_grad()
def fold_scales_(model: nn.Module, scales: dict[str, torch.Tensor], config: Any = None) -> None:
    """Fold ``scales`` (layer name -> (in,) AWQ scales ``s``) into ``model`` in place (module docstring).

    Layers reading one norm must all be given the same ``s`` (or be absent: they are then scaled with
    the others); ``config`` (the model's) gives the heads for grouped-query attention."""
    heads, kv = attention_heads(config)
    done: set[str] = set()
    for name, s in scales.items():
        if name in done:
            continue
        base, role = _role(name)
        s = s.detach().float()
        if role in NORMS:
            readers = [f"{base}.{r}" for r, nm in NORMS.items() if nm == NORMS[role]]
            for r in readers:
                if r in scales and not torch.equal(scales[r].float(), s):
                    raise ModelError(r, f"reads {base}.{NORMS[role]} like {name} but has other AWQ scales",
                                     fix=FIX)
            norm = model.get_submodule(f"{base}.{NORMS[role]}")
            w = getattr(norm, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
                raise ModelError(f"{base}.{NORMS[role]}", "is not an RMSNorm with a weight (AWQ scales fold into it)",
                                 fix=FIX)
            lins = []
            for r in readers:
                try:
                    lins.append(_float_linear(model, r))
                except AttributeError:  # no such layer in this block (e.g. a fused projection): nothing reads it
                    continue
            w.div_(s.to(w.dtype))
            for lin in lins:
                lin.weight.mul_(s.to(lin.weight.dtype))
            done.update(readers)
        else:
            lin, prev = _float_linear(model, name), _float_linear(model, f"{base}.{ROWS[role]}")
            rows = s
            if role == "self_attn.o_proj" and heads and kv != heads:
                per = s.reshape(kv, heads // kv, -1)
                if not bool((per == per[:, :1]).all()):
                    raise ModelError(name, f"o_proj's AWQ scales differ between query heads that share a kv head "
                                     f"({heads} heads / {kv} kv heads): v_proj's rows cannot carry them", fix=FIX)
                rows = per[:, 0].reshape(-1)
            if rows.shape[0] != prev.weight.shape[0]:
                raise ModelError(name, f"has {s.shape[0]} inputs and {base}.{ROWS[role]} {prev.weight.shape[0]} "
                                 "outputs: its scales cannot fold into that layer's rows", fix=FIX)
            lin.weight.mul_(s.to(lin.weight.dtype))
            prev.weight.div_(rows.to(prev.weight.dtype).unsqueeze(1))
            if prev.bias is not None:
                prev.bias.div_(rows.to(prev.bias.dtype))
            done.add(name)
