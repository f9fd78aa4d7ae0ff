"""Int8 attention matmuls for Hugging Face encoders (BERT family), static or dynamic.

Hugging Face models do not trace with ``torch.fx``, but since transformers 4.48 their attention
modules call a *function* looked up by name in ``transformers.AttentionInterface``
(``config._attn_implementation``: ``eager``, ``sdpa``...). This file registers one more,
``nnsqueeze_int8``, which computes eager attention with the inputs of both matmuls quantized:

    scores = Q8(q) @ Q8(k^T) * scaling + mask ;  p = softmax(scores) ;  out = Q8(p) @ Q8(v)

(``Q8``: uint8 asymmetric per tensor; static mode takes the ``quantize`` step's ``activations``
format instead, an :class:`~nnsqueeze.quant.act_scheme.ActScheme`: int8 symmetric, 2..7 bits in an
8-bit container, or 16 bits, where ORT multiplies in float on the exact dequantized values). Softmax,
the mask add and the scaling stay float by design: ORT has no int8 softmax for these graphs and the
probabilities are re-quantized for ``p @ v`` anyway. The qparams live on an :class:`AttentionQuant`
child (``attn_quant``) of each attention module (the function receives the module), one set per layer:

- ``static`` (the ``quantize`` step with ``ops: [matmul]``): calibrated per-tensor scales and zero
  points (buffers, saved with the model); exported as QDQ around the two MatMuls, which ONNX
  Runtime runs as integer matmuls (``MatMulIntegerToFloat``);
- ``dynamic`` (``quantize-dynamic`` with ``attention: true``): ranges computed at run time exactly
  like ONNX's ``DynamicQuantizeLinear`` (uint8, range including 0, round half to even), the
  product on the integer codes; exported as ``DynamicQuantizeLinear`` x2 -> ``MatMulInteger`` ->
  ``Cast`` -> ``Mul(scale_a * scale_b)``.

The same attention mask as ``eager`` is used (an additive float mask, registered for the name in
``transformers.masking_utils.AttentionMaskInterface``). Example::

    >>> import torch, transformers
    >>> from nnsqueeze.quant.attention import attach_attention
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=20)
    >>> model = transformers.BertModel(cfg).eval()
    >>> names = attach_attention(model, "dynamic")
    >>> names, model.config._attn_implementation
    (['encoder.layer.0.attention.self'], 'nnsqueeze_int8')
    >>> model(input_ids=torch.randint(0, 50, (2, 5))).last_hidden_state.shape
    torch.Size([2, 5, 16])
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..ops.dynamic import dynamic_int_matmul, dynamic_qparams
from ..ops.quant import fake_quantize_ste, qrange
from .act_scheme import ActScheme
from .act_state import ActQuantState, op_kernels
from .dynamic import dynamic_matmul_symbolic
from .protocol import QuantizedOp

Tensor = torch.Tensor

IMPL = "nnsqueeze_int8"
ATTR = "attn_quant"
INPUTS = ("query", "key", "probs", "value")
ACT_QMIN, ACT_QMAX = qrange(8, signed=False)


# ------------------------------------------------------------------------------------------------
# Run-time fake quantization (the exact integer matmul is nnsqueeze.ops.dynamic.dynamic_int_matmul)
# ------------------------------------------------------------------------------------------------
def dynamic_fake_quant_ste(x: Tensor) -> Tensor:
    """Run-time per-tensor uint8 fake quantization with a straight-through gradient (training)."""
    s, z = dynamic_qparams(x)
    return fake_quantize_ste(x, s, z, ACT_QMIN, ACT_QMAX)


class _DynamicMatMulFn(torch.autograd.Function):
    """Value: :func:`dynamic_int_matmul`; ONNX: DynamicQuantizeLinear x2 -> MatMulInteger -> scale."""

    @staticmethod
    def forward(ctx, a, b):  # noqa: D401
        return dynamic_int_matmul(a, b)

    @staticmethod
    def symbolic(g, a, b):
        return dynamic_matmul_symbolic(g, a, b)


# ------------------------------------------------------------------------------------------------
# Per-layer state
# ------------------------------------------------------------------------------------------------
class AttentionQuant(ActQuantState, QuantizedOp):
    """Quantization of one attention layer's two matmuls (``mode``: ``static`` or ``dynamic``)."""

    onnx_quantized = True

    def revert_in(self, owner: nn.Module, attr: str) -> None:
        """Drop it: the ``nnsqueeze_int8`` attention without a quantizer is eager float attention."""
        del owner._modules[attr]

    def __init__(self, mode: str, scheme: ActScheme | None = None) -> None:
        super().__init__()
        if mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
        if mode == "dynamic" and scheme is not None and not scheme.is_default:
            raise ValueError(f"dynamic attention quantization is uint8 asymmetric only, got {scheme.describe()}")
        self.mode = mode
        # Run-time ranges amplify 1e-7 float differences between torch and ORT into code flips:
        # the exporter then checks the mean difference (see export.onnx.verify_onnx).
        self.onnx_verify_mean = mode == "dynamic"
        self._register_qparams(INPUTS if mode == "static" else (), scheme)

    def start_calibration(self, make_observer: Callable[..., Any], name: str) -> None:
        if self.mode != "static":
            raise ValueError("only static attention quantization is calibrated")
        super().start_calibration(make_observer, name)

    def matmul(self, a: Tensor, b: Tensor, na: str, nb: str) -> Tensor:
        """``a @ b`` with ``a`` / ``b`` quantized as inputs ``na`` / ``nb`` (names in INPUTS)."""
        if self._observers is not None:  # calibration: float, ranges recorded
            self._observers[na].observe(a)
            self._observers[nb].observe(b)
            return torch.matmul(a, b)
        if self.mode == "static":
            return torch.matmul(self._fq(a, na), self._fq(b, nb))
        if torch.onnx.is_in_onnx_export():
            return _DynamicMatMulFn.apply(a, b)
        if self.training or torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return torch.matmul(dynamic_fake_quant_ste(a), dynamic_fake_quant_ste(b))
        return dynamic_int_matmul(a, b).to(a.dtype)

    def extra_repr(self) -> str:
        codes = "uint8 per-tensor" if self.ascheme.is_default else self.ascheme.describe()
        return f"{self.mode}: {codes} q, k^T, probs, v"


def quantized_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                attention_mask: Tensor | None, scaling: float | None = None,
                                dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """Eager attention (transformers' ``eager_attention_forward``) with int8 matmul inputs when
    ``module`` holds an :class:`AttentionQuant`; plain float eager attention otherwise.
    ``query`` (B, H, T, D); ``key``/``value`` (B, H_kv, S, D); returns ((B, T, H, D), probs)."""
    aq = module._modules.get(ATTR)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the key/value heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    kt = key.transpose(2, 3)  # quantized after the transpose: per tensor, and DQ feeds MatMul directly
    scores = (torch.matmul(query, kt) if aq is None else aq.matmul(query, kt, "query", "key")) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value) if aq is None else aq.matmul(probs, value, "probs", "value")
    return out.transpose(1, 2).contiguous(), probs


# ------------------------------------------------------------------------------------------------
# Model walking
# ------------------------------------------------------------------------------------------------
_DISPATCHES: dict[type, bool] = {}


def _dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention function up in ``ALL_ATTENTION_FUNCTIONS``."""
    if cls not in _DISPATCHES:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _DISPATCHES[cls] = "ALL_ATTENTION_FUNCTIONS" in src
    return _DISPATCHES[cls]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` whose forward dispatches through transformers' ``AttentionInterface``."""
    if "transformers" not in sys.modules:  # not a Hugging Face model: do not import transformers
        return []
    return [(n, m) for n, m in model.named_modules() if n and _dispatches(type(m))]


def register() -> None:
    """Register ``nnsqueeze_int8`` (attention function and its eager-style mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPL, quantized_attention_forward)
    AttentionMaskInterface.register(IMPL, eager_mask)


def _pretrained(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def attach_attention(model: nn.Module, mode: str, names: list[str] | None = None,
                     scheme: ActScheme | None = None) -> list[str]:
    """Give each attention module (or those in ``names``) an :class:`AttentionQuant` of ``mode``
    (``scheme``: static codes, default uint8 asymmetric)
    and switch every Hugging Face (sub)model's ``config._attn_implementation`` to ``nnsqueeze_int8``.
    Returns the names of the modules that got one."""
    register()
    mods = dict(attention_modules(model))
    if names is not None:
        missing = [n for n in names if n not in mods]
        if missing:
            raise KeyError(f"attention modules {missing} not found (or not dispatching through AttentionInterface)")
        mods = {n: mods[n] for n in names}
    for m in mods.values():
        m.add_module(ATTR, AttentionQuant(mode, scheme).to(_device(m)))
    for pm in _pretrained(model):
        if pm.config._attn_implementation != IMPL:
            pm.set_attn_implementation(IMPL)
            if pm.config._attn_implementation != IMPL:  # a model that refuses dynamic switching
                pm.config._attn_implementation = IMPL
    return list(mods)


def _device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _float_by_design(ctx: Any, step: str, model: nn.Module, names: list[str]) -> None:
    ctx.skip(step, f"attention softmax, mask add and scaling ({len(names)} layers)",
             "kept in float by design: they act on the float output of the integer q @ k^T, and the "
             "probabilities are re-quantized for p @ v")
    norms = [n for n, m in model.named_modules() if "LayerNorm" in type(m).__name__]
    if norms:
        ctx.skip(step, f"LayerNorm ({len(norms)} modules)", "kept in float by design (no int8 LayerNorm kernel "
                 "in ONNX Runtime; its statistics are sensitive to 8-bit noise)")


def quantize_attention_static(model: nn.Module, batches: list, make_observer: Callable[..., Any], ctx: Any,
                              step: str, device: Any = None, scheme: ActScheme | None = None) -> dict[str, Any]:
    """Static attention matmuls in the codes of ``scheme`` (default uint8 asymmetric): attach,
    calibrate on ``batches``, report. Returns the record."""
    from ..data import call_model, split, to_device

    scheme = scheme or ActScheme()
    previous = sorted({str(pm.config._attn_implementation) for pm in _pretrained(model)})
    names = attach_attention(model, "static", scheme=scheme)
    mods = {n: model.get_submodule(n) for n in names}
    for n, m in mods.items():
        m._modules[ATTR].start_calibration(make_observer, n)
    with torch.no_grad():
        for batch in batches:
            call_model(model, to_device(split(batch)[0], device))
    kept = []
    for n, m in mods.items():
        aq = m._modules[ATTR]
        if aq.calibrated_batches == 0:
            del m._modules[ATTR]
            ctx.skip(step, n, "attention matmuls left in float: never called during calibration")
            continue
        aq.finish_calibration()
        kept.append(n)
        ctx.report.layer(n, act_bits=scheme.bits, scheme=f"q@k^T, p@v: {scheme.describe()} static",
                         ort_kernels=op_kernels("matmul", scheme))
    _float_by_design(ctx, step, model, kept)
    record = {"mode": "static", "modules": kept, "implementation": IMPL, "previous": previous}
    if not scheme.is_default:  # default records stay as they were
        record["act_scheme"] = scheme.to_dict()
    return record


def quantize_attention_dynamic(model: nn.Module, ctx: Any, step: str, where: str) -> dict[str, Any]:
    """Dynamic int8 attention matmuls (no data needed). Returns the record."""
    if not attention_modules(model):
        ctx.skip(step, f"attention of {type(model).__name__}",
                 "attention: true needs a Hugging Face model whose attention dispatches through "
                 "transformers' AttentionInterface; none found, attention matmuls stay float")
        return {}
    previous = sorted({str(pm.config._attn_implementation) for pm in _pretrained(model)})
    names = attach_attention(model, "dynamic")
    for n in names:
        ctx.report.layer(n, act_bits=8, scheme="q@k^T, p@v: a8 dynamic per-tensor asym",
                         ort_kernels="MatMulInteger")
    _float_by_design(ctx, step, model, names)
    ctx.report.step(quantized_attention_layers=len(names))
    return {"mode": "dynamic", "modules": names, "implementation": IMPL, "previous": previous}


def rebuild_attention(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Recreate the attention quantizers of ``record`` on a fresh model (qparams from the state dict)."""
    from ..errors import ModelError

    if not record or not record.get("modules"):
        return model
    try:
        attach_attention(model, record["mode"], list(record["modules"]),
                         scheme=ActScheme.from_dict(record.get("act_scheme")))
    except (KeyError, ImportError, ValueError) as e:
        raise ModelError("attention record", str(e),
                         fix="load the artifact with the same model class it was made from") from None
    return model
