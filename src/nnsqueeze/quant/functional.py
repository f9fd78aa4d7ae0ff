"""Static quantization of activation-activation ops: residual ``add`` and ``matmul``/``bmm``/``@``.

Linear/Conv layers quantize their inputs themselves (:mod:`nnsqueeze.quant.modules`); the
operations *between* activations (a skip connection's ``x + f(x)``, attention's ``q @ k^T`` and
``p @ v``) are plain torch functions with no module to convert. This file inserts one with an fx
pass (``torch.fx.symbolic_trace``): every selected ``add`` / ``matmul`` node whose two operands are
activations becomes a call to

- :class:`QuantAdd`: per-tensor Q/DQ on both inputs *and* the output, so ONNX Runtime fuses
  ``DQ, DQ -> Add -> Q`` into ``QLinearAdd``;
- :class:`QuantMatMul`: per-tensor Q/DQ on both inputs; ORT runs the product on the integer
  codes (``MatMulIntegerToFloat`` / ``QLinearMatMul``), the output stays float.

The codes follow the step's ``activations`` format (an
:class:`~nnsqueeze.quant.act_scheme.ActScheme`, by default uint8 asymmetric): int8 symmetric,
2..7 bits (an 8-bit container with a Clip on the codes; int8 codes too are stored shifted by
+128 in uint8, where ORT fuses the integer kernels around them) or 16 bits (``com.microsoft`` Q/DQ; ORT
then adds/multiplies in float on the exact dequantized values), exported by
:func:`~nnsqueeze.quant.act_scheme.act_qdq_export`. The format is recorded only when it is not
the default (``act_scheme`` in the record).

The qparams are calibrated like the layers' (one observer per input / output, the ``quantize``
step's ``calibration.method``), on the calibration batches run through the already quantized
model. Hugging Face encoders do not trace with fx: their attention matmuls go through
:mod:`nnsqueeze.quant.attention` instead. In a recipe::

    - quantize:
        ops: [add, matmul]        # default []: only Linear/Conv layers
        activations: {bits: 8, symmetric: true}   # the ops' codes too (default uint8 asymmetric)

In Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.functional import insert_quant_ops
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> gm, found, skipped = insert_quant_ops(Res(), ["add"])
    >>> found, type(gm.nsq_add).__name__
    ({'add': 'add'}, 'QuantAdd')

Operands that are parameters or buffers (a bias add, a weight matmul) are not activation ops and
are reported as skipped; so are ops whose operands turn out not to be float tensors during
calibration (e.g. ``x.size(1) + 1``), which go back to the plain function.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..data import call_model, split, to_device
from ..errors import ModelError
from . import attention
from .act_scheme import ActScheme
# The qparam state and the report's kernel wording are shared with quant/attention.py, so they sit
# below both (quant/act_state.py); re-exported here for the callers that have always found them here.
from .act_state import ACT_QMAX, ACT_QMIN, ActQuantState, op_kernels
from .protocol import QuantizedOp

__all__ = ["ACT_QMIN", "ACT_QMAX", "OPS", "OP_MODULES", "ActQuantState", "OpQuant", "QuantAdd", "QuantMatMul", "trace",
           "insert_quant_ops", "restore_op", "op_kernels", "op_modules", "quantize_ops", "rebuild_ops"]

Tensor = torch.Tensor

OPS = ("add", "matmul")

# fx node targets of each op kind (call_function targets, call_method names).
_FUNCS: dict[str, tuple] = {"add": (operator.add, torch.add), "matmul": (operator.matmul, torch.matmul, torch.bmm)}
_METHODS: dict[str, tuple[str, ...]] = {"add": ("add",), "matmul": ("matmul", "bmm")}


class OpQuant(ActQuantState, QuantizedOp):
    """Shared state: per-tensor qparams for inputs ``a``, ``b`` (and ``output`` for add) in the codes
    of ``scheme`` (default uint8 asymmetric)."""

    kind = "op"
    quant_output = False
    onnx_quantized = True  # tells the exporter to verify with quantized tolerances

    def revertible_in(self, owner: nn.Module) -> bool:
        return isinstance(owner, torch.fx.GraphModule)  # the op is a call_module node of owner's graph

    def revert_in(self, owner: nn.Module, attr: str) -> None:
        """Route the graph's call back to the plain function; this module leaves ``owner``."""
        restore_op(owner, attr)

    def __init__(self, scheme: ActScheme | None = None) -> None:
        super().__init__()
        self._register_qparams(("a", "b", "output") if self.quant_output else ("a", "b"), scheme)
        self.unsupported_: str | None = None  # why calibration found this op not quantizable

    # -- calibration -----------------------------------------------------------------------
    def start_calibration(self, make_observer: Callable[..., Any], name: str) -> None:
        super().start_calibration(make_observer, name)
        self.unsupported_ = None

    # -- forward -----------------------------------------------------------------------------

    def _op(self, a: Any, b: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, a: Any, b: Any) -> Any:
        if self._observers is not None:
            if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.is_floating_point()
                    and b.is_floating_point()):
                kinds = ", ".join(f"{type(v).__name__}{'' if not isinstance(v, Tensor) else ' ' + str(v.dtype)}"
                                  for v in (a, b))
                self.unsupported_ = f"operands are not two float tensors ({kinds})"
            if self.unsupported_ is not None:
                return self._op(a, b)
            self._observers["a"].observe(a)
            self._observers["b"].observe(b)
            y = self._op(a, b)
            if self.quant_output:
                self._observers["output"].observe(y)
            return y
        if self.unsupported_ is not None:
            return self._op(a, b)
        y = self._op(self._fq(a, "a"), self._fq(b, "b"))
        return self._fq(y, "output") if self.quant_output else y

    def extra_repr(self) -> str:
        return f"{self.ascheme.describe()} inputs" + (" and output" if self.quant_output else "")


class QuantAdd(OpQuant):
    """``a + b`` with both inputs and the output fake-quantized (ORT: ``QLinearAdd``). In eval,
    uint8 codes of two same-shape inputs add as ORT's kernel adds them
    (:func:`~nnsqueeze.quant.integer.qlinear_add_codes`: float32 ratios and fmas, not
    ``Q(DQ(a) + DQ(b))``, which lands on the other side of a rounding boundary now and then)."""

    kind = "add"
    quant_output = True

    def _op(self, a, b):
        return a + b

    def forward(self, a: Any, b: Any) -> Any:
        if self._observers is not None or self.unsupported_ is not None or self.training \
                or torch.onnx.is_in_onnx_export() or not self.ascheme.is_default \
                or not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
            return super().forward(a, b)
        from .integer import qlinear_add_codes

        q = qlinear_add_codes(a, b, self.a_scale_, self.a_zero_point_, self.b_scale_, self.b_zero_point_,
                              self.output_scale_, self.output_zero_point_, ACT_QMIN, ACT_QMAX)
        y = ((q - self.output_zero_point_.float()) * self.output_scale_.float()).to(a.dtype)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            y_sim = super().forward(a, b)  # same values, the float simulation's straight-through gradients
            y = y_sim + (y - y_sim).detach()
        return y


class QuantMatMul(OpQuant):
    """``a @ b`` with both inputs fake-quantized (ORT: integer MatMul on the codes)."""

    kind = "matmul"

    def _op(self, a, b):
        return torch.matmul(a, b)


OP_MODULES: dict[str, type[OpQuant]] = {"add": QuantAdd, "matmul": QuantMatMul}


# ------------------------------------------------------------------------------------------------
# fx pass
# ------------------------------------------------------------------------------------------------
class _LeafTracer(torch.fx.Tracer):
    """Keeps nnsqueeze's quantized layers as leaves: their forward branches on calibration/export
    state at run time, which tracing through would freeze."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or type(m).__module__.startswith("nnsqueeze.quant.")


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with nnsqueeze's layers kept as leaves (raises what fx raises)."""
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    name = type(model).__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _kind(node: torch.fx.Node, ops: Iterable[str]) -> str | None:
    for k in ops:
        if node.op == "call_function" and node.target in _FUNCS[k]:
            return k
        if node.op == "call_method" and node.target in _METHODS[k]:
            return k
    return None


def _operand_problem(node: torch.fx.Node) -> str | None:
    """Why ``node`` is not an op between two activations (None when it is)."""
    if len(node.args) != 2 or node.kwargs:  # e.g. torch.add(x, y, alpha=2)
        return f"{node.op} {getattr(node.target, '__name__', node.target)} with extra arguments " \
               f"{dict(node.kwargs) or list(node.args[2:])}"
    for a in node.args:
        if not isinstance(a, torch.fx.Node):
            return f"one operand is a Python constant ({a!r}), not an activation"
        if a.op == "get_attr":
            return f"one operand is the parameter/buffer '{a.target}' (a weight or bias op, not between activations)"
    return None


def insert_quant_ops(model: nn.Module, ops: Iterable[str], only: dict[str, str] | None = None,
                     scheme: ActScheme | None = None) -> tuple[torch.fx.GraphModule, dict[str, str], dict[str, str]]:
    """Trace ``model`` and route its selected ``ops`` (``"add"``, ``"matmul"``) through new
    :class:`QuantAdd` / :class:`QuantMatMul` submodules named ``nsq_<node name>``.

    ``only``: node name -> kind to insert exactly (rebuild from a record); ``scheme``: their
    activation codes (default uint8 asymmetric). Returns ``(graph module,
    {node name: kind} inserted, {node name: reason} not inserted)``. Raises what fx raises when the
    model does not trace.
    """
    ops = [o for o in OPS if o in set(ops)]
    gm = trace(model)
    found: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        kind = _kind(node, ops)
        if kind is None:
            continue
        if only is not None:
            if only.get(node.name) != kind:
                continue
        else:
            problem = _operand_problem(node)
            if problem is not None:
                skipped[node.name] = problem
                continue
        mod_name = f"nsq_{node.name}"
        gm.add_submodule(mod_name, OP_MODULES[kind](scheme))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(mod_name, args=tuple(node.args[:2]))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        found[node.name] = kind
    if only is not None and set(only) - set(found):
        missing = sorted(set(only) - set(found))
        raise KeyError(f"ops {missing} not found in the traced model")
    gm.graph.lint()
    gm.recompile()
    return gm, found, skipped


def restore_op(gm: torch.fx.GraphModule, mod_name: str) -> None:
    """Replace the call of op module ``mod_name`` by the plain function again (and drop it)."""
    mod = gm.get_submodule(mod_name)
    fn = operator.add if mod.kind == "add" else torch.matmul
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == mod_name:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(fn, args=node.args)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.delete_submodule(mod_name)
    gm.recompile()


_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _module(gm: torch.fx.GraphModule, node: Any) -> nn.Module | None:
    return gm.get_submodule(node.target) if isinstance(node, torch.fx.Node) and node.op == "call_module" else None


def tie_add_qparams(gm: torch.fx.GraphModule) -> int:
    """Give each :class:`QuantAdd` input the output qparams of the quantized layer or add that
    produces it, and each quantized layer reading an add's output (through Identity/Dropout/a zero
    pad) that add's output qparams. Calibrated apart, the same tensor gets two slightly different
    scales, and ONNX Runtime then runs a float DequantizeLinear -> QuantizeLinear between the
    integer kernels; tied, the pair is an exact round trip that the export removes. Returns how
    many qparam pairs were tied."""
    from .modules import FakeQuantMixin

    def source(node: Any) -> nn.Module | None:  # the quantized-output module a value comes from
        m = _module(gm, node)
        while isinstance(m, _PASS) and len(node.args) == 1:
            node = node.args[0]
            m = _module(gm, node)
        if isinstance(m, QuantAdd) and m.unsupported_ is None and m.ascheme.is_default:
            return m
        if isinstance(m, FakeQuantMixin) and m.quant_output and m.ascheme.is_default:
            return m
        return None

    def copy_from(dst: nn.Module, which: str, src: nn.Module) -> None:
        dst._buffers[f"{which}_scale_"].copy_(src.output_scale_)
        dst._buffers[f"{which}_zero_point_"].copy_(src.output_zero_point_)

    tied = 0
    with torch.no_grad():
        for node in gm.graph.nodes:  # topological: a producer is tied before its readers copy from it
            m = _module(gm, node)
            if isinstance(m, QuantAdd) and m.unsupported_ is None and m.ascheme.is_default:
                for which, arg in zip(("a", "b"), node.args[:2]):
                    src = source(arg)
                    if src is not None:
                        copy_from(m, which, src)
                        tied += 1
            elif isinstance(m, FakeQuantMixin) and m.ascheme.is_default and node.args:
                arg, pad = node.args[0], False
                while isinstance(_module(gm, arg), (*_PASS, nn.ZeroPad2d, nn.ZeroPad1d)):
                    pad = pad or not isinstance(_module(gm, arg), _PASS)
                    arg = arg.args[0]
                src = source(arg)
                if isinstance(src, QuantAdd) and (not pad or int(src.output_zero_point_) in range(0, 256)):
                    copy_from(m, "input", src)
                    tied += 1
    return tied


def op_modules(model: nn.Module) -> list[tuple[str, OpQuant]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OpQuant)]


# ------------------------------------------------------------------------------------------------
# Orchestration (called by the quantize step)
# ------------------------------------------------------------------------------------------------
def quantize_ops(model: nn.Module, ops: Iterable[str], batches: list, make_observer: Callable[..., Any],
                 ctx: Any, step: str, device: Any = None, scheme: ActScheme | None = None
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the ``ops`` of ``model`` (``"add"``, ``"matmul"``), calibrated on ``batches``, in the
    activation codes of ``scheme`` (default uint8 asymmetric).

    Hugging Face attention (modules dispatching through ``AttentionInterface``) takes ``matmul``
    through :mod:`nnsqueeze.quant.attention`; everything else goes through the fx pass, whose
    result (a ``GraphModule``) is returned in place of ``model``. Ops left in float go through
    ``ctx.skip``. Returns ``(model, record)`` for :func:`rebuild_ops`.
    """
    ops = [o for o in OPS if o in set(ops)]
    scheme = scheme or ActScheme()
    record: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    fx_ops = list(ops)
    if "matmul" in ops and attention.attention_modules(model):
        record["attention"] = attention.quantize_attention_static(model, batches, make_observer, ctx, step, device,
                                                                  scheme=scheme)
        figures["quantized_attention_layers"] = len(record["attention"]["modules"])
        fx_ops.remove("matmul")
    if fx_ops:
        try:
            gm, found, skipped = insert_quant_ops(model, fx_ops, scheme=scheme)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: these ops stay float
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            ctx.skip(step, f"{'/'.join(fx_ops)} ops of {type(model).__name__}",
                     f"the model does not trace with torch.fx ({type(e).__name__}: {first}); these ops stay float")
            gm, found, skipped = None, {}, {}
        for n, why in skipped.items():
            ctx.skip(step, n, f"{n} left in float: {why}")
        if gm is not None and not found:
            ctx.skip(step, f"{'/'.join(fx_ops)} ops of {type(model).__name__}",
                     "no such op between two activations in the traced graph")
        if found:
            gm.train(model.training)
            mods = {n: gm.get_submodule(f"nsq_{n}") for n in found}
            for n, m in mods.items():
                m.start_calibration(make_observer, n)
            with torch.no_grad():
                for batch in batches:
                    call_model(gm, to_device(split(batch)[0], device))
            kept: dict[str, str] = {}
            for n, m in mods.items():
                why = m.unsupported_ or ("never called during calibration" if m.calibrated_batches == 0 else None)
                if why is not None:
                    restore_op(gm, f"nsq_{n}")
                    ctx.skip(step, n, f"{found[n]} left in float: {why}")
                    continue
                m.finish_calibration()
                kept[n] = found[n]
                ctx.report.layer(n, act_bits=scheme.bits, scheme=f"{found[n]}: {m.extra_repr()}",
                                 ort_kernels=op_kernels(found[n], scheme))
            if kept:
                model = gm
                record["fx"] = kept
                if "add" in kept.values():
                    figures["add_qparams_tied"] = tie_add_qparams(gm)
                if not scheme.is_default:  # default records stay as they were
                    record["act_scheme"] = scheme.to_dict()
                figures["quantized_ops"] = {k: sum(v == k for v in kept.values()) for k in fx_ops}
    if figures:
        ctx.report.step(**figures)
        if not scheme.int8_kernels:
            ctx.fallback(step, f"ops {ops} with {scheme.describe()} activations: ONNX Runtime has no 16-bit "
                         "add/matmul kernels, these ops run in float on the exact dequantized 16-bit values")
    return model, record


def rebuild_ops(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Recreate :func:`quantize_ops`' structure on a fresh (already layer-converted) model; the
    qparams come from the state dict."""
    if record.get("attention"):
        attention.rebuild_attention(model, record["attention"])
    if record.get("fx"):
        try:
            model, _, _ = insert_quant_ops(model, set(record["fx"].values()), only=dict(record["fx"]),
                                           scheme=ActScheme.from_dict(record.get("act_scheme")))
        except Exception as e:  # noqa: BLE001
            raise ModelError("quantize record: ops", f"cannot recreate the quantized ops {record['fx']}: "
                             f"{type(e).__name__}: {e}",
                             fix="load the artifact with the same model class it was made from") from None
    return model
