"""AWQ input scales folded into the op before each layer, so AWQ-packed models fit the open formats.

An AWQ-packed layer computes ``(x / s) @ Q(W * s).T`` (an ``input_scale_`` buffer ``s``); the formats
hold only ``Q(W * s)``. As AutoAWQ does for LLaMA, the ``1 / s`` moves into the op that produces
``x``:

- ``q/k/v_proj``: ``input_layernorm.weight / s`` (all three must carry the same ``s``);
- ``gate/up_proj``: ``post_attention_layernorm.weight / s`` (both the same ``s``);
- ``down_proj``: rows of ``up_proj`` (``down``'s input is ``act(gate) * up``, linear in ``up``);
- ``o_proj``: rows of ``v_proj`` (attention output channels are weighted sums of ``v``'s). Under
  grouped-query attention a kv head serves several query heads, so ``s`` must be the same on them.

Rows of a packed layer are scaled through its group scales (``(q - z) * s_g / s_n``), so codes stay
as they are. The awq step's ``share_scales: true`` gives scales that always fold; anything else is
an ExportError naming it. Folding changes float rounding only: the norms' and the group scales'
divisions round in float32 (and, for formats storing float16 scales, the folded group scales round
to float16: a relative weight change up to 2**-11 on ``up_proj`` / ``v_proj``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ExportError
from ..llm.awq_fold import NORMS, ROWS, fold_role
from ..llm.packed import PackedLinear

FIX = "quantize with `awq: {..., pack: true, share_scales: true}` (one scale per shared input, GQA-consistent)"


def has_input_scales(model: nn.Module) -> bool:
    return any("input_scale_" in m._buffers for m in model.modules() if isinstance(m, PackedLinear))


def _split(name: str) -> tuple[str, str]:
    found = fold_role(name)
    if found is not None:
        return found
    raise ExportError(name, "has AWQ input scales and no op before it to fold them into (LLaMA layout: q/k/v, "
                      "gate/up, down, o projections)", fix="keep this layer out of awq (ignore it), or use rtn/gptq")


@torch.no_grad()
def _scale_rows(lin: nn.Module, s: torch.Tensor, name: str, round_to: torch.dtype | None) -> None:
    """Divide output row ``n`` of ``lin`` by ``s[n]``."""
    if isinstance(lin, PackedLinear):
        new = lin.weight_scale_ / s.unsqueeze(1)
        lin.weight_scale_.copy_(new if round_to is None else new.to(round_to).float())
    elif type(lin) is nn.Linear:
        lin.weight.div_(s.unsqueeze(1).to(lin.weight.dtype))
    else:
        raise ExportError(name, f"cannot fold AWQ scales into {type(lin).__name__}", fix=FIX)
    if lin.bias is not None:
        lin.bias.div_(s.to(lin.bias.dtype))


@torch.no_grad()
def fold_awq(model: nn.Module, round_to: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` with every AWQ ``input_scale_`` folded (see the module docstring), or
    ``model`` itself when it has none. ``round_to``: the dtype the format stores scales in."""
    if not has_input_scales(model):
        return model
    model = copy.deepcopy(model)
    scaled = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear) and "input_scale_" in m._buffers}
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    done: set[str] = set()
    for name, m in scaled.items():
        base, role = _split(name)
        s = m.input_scale_.detach().float()
        if role in NORMS:
            if name in done:
                continue
            readers = [f"{base}.{r}" for r, nm in NORMS.items() if nm == NORMS[role]]
            for r in readers:   # everything reading the norm must divide by the same s
                other = scaled.get(r)
                if other is None or not torch.equal(other.input_scale_.float(), s):
                    why = "has no AWQ scales" if other is None else "has other AWQ scales"
                    raise ExportError(name, f"its input scales cannot fold into {base}.{NORMS[role]}: {r} reads "
                                      f"the same input and {why}", fix=FIX)
            norm = model.get_submodule(f"{base}.{NORMS[role]}")
            w = getattr(norm, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
                raise ExportError(f"{base}.{NORMS[role]}", "is not an RMSNorm with a weight (AWQ scales fold into it)",
                                  fix="export AWQ models of the LLaMA architecture, or use rtn/gptq")
            w.div_(s.to(w.dtype))
            done.update(readers)
        else:
            prev = model.get_submodule(f"{base}.{ROWS[role]}")
            if role == "self_attn.o_proj" and heads and kv != heads:
                per = s.reshape(kv, heads // kv, -1)
                if not bool((per == per[:, :1]).all()):
                    raise ExportError(name, f"o_proj's input scales differ between query heads that share a kv head "
                                      f"(grouped-query attention, {heads} heads / {kv} kv heads): v_proj's rows "
                                      "cannot carry them", fix=f"{FIX}, or ignore o_proj in awq "
                                      "(ignore: ['re:.*o_proj']) and quantize it with rtn/gptq")
                s = per[:, 0].reshape(-1)
            _scale_rows(prev, s, name, round_to)   # prev's own input scale (if any) is independent of its rows
            done.add(name)
    for m in scaled.values():
        del m._buffers["input_scale_"]
    return model
