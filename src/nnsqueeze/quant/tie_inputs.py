"""One tensor, one set of qparams: a quantized layer reading another quantized layer's output takes
that layer's output qparams as its input qparams.

Why: each layer calibrates its input on its own observer. When something sits between the two
layers that changes what the second observer sees without changing the codes ONNX Runtime runs, the
two ranges differ. The case that matters is a zero pad: TF-"SAME" stride-2 convs (EfficientNet-Lite,
MobileNet ports) have a ``ZeroPad2d`` in front, whose zeros go into the conv's input observer. With
``minmax`` the range is the same (0 is already inside it), but a clipping method (``mse``,
``percentile``, ``kl``) then picks another range. The export folds the pad into the conv
(:mod:`nnsqueeze.export.qdq`), leaving ``Q(s1) -> DQ(s1) -> Q(s2) -> DQ(s2) -> Conv``, and ONNX
Runtime's optimizer collapses the middle ``DQ -> Q`` pair: the conv reads the producer's codes with
the producer's scale ``s1``, while the torch simulation had requantized to ``s2``. Measured on the
tests' TF-style mobile CNN with ``calibration: {method: mse}``: 0.5-0.7 8-bit steps of the logit
range between ORT and the simulation, exact (1.5e-5) once tied. The producer's range is the one to
keep: it is what ORT runs, and it was calibrated on the unpadded values.

Pass-through modules followed: ``Identity``, ``Dropout*``, ``Flatten``, zero ``ConstantPad``/
``ZeroPad`` (1d/2d/3d), and a ``ReLU``/``ReLU6`` module after a layer that applies that clamp
itself. Functional pads inside a ``forward`` are not seen (module hooks); the quantize step reports
how many inputs were tied::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(2, 2, 2, 2)).eval()
    >>> a, b = convert_(model[0]), convert_(model[2])
    >>> a.output_scale_.fill_(0.02); b.input_scale_.fill_(0.03)  # doctest: +ELLIPSIS
    tensor(...)
    >>> tie_layer_inputs(model, lambda: model(torch.randn(1, 1, 4, 4)))
    [('2', '0')]
    >>> float(b.input_scale_) == float(a.output_scale_)
    True
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .modules import FakeQuantMixin

_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten)
_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)


def _passes(m: nn.Module) -> bool:
    """True when ``m``'s output holds its input's codes: a pass-through, or a pad with value 0 (the
    zero point's code)."""
    return isinstance(m, _PASS) or (isinstance(m, _PADS) and float(getattr(m, "value", 0.0)) == 0.0)


def _clamps_nothing(m: nn.Module, src: nn.Module) -> bool:
    """A ReLU / ReLU6 module after a layer that already applies that clamp (its fused ``act``): the
    module is then an identity on the layer's output (EfficientNet's blocks call one shared ReLU6
    module after each conv, so the module stays while the conv applies the clamp itself)."""
    act = getattr(src, "act", None)
    if type(m) is nn.ReLU:
        return act in ("relu", "relu6")
    return type(m) is nn.ReLU6 and act == "relu6"


def _produces_codes(m: nn.Module) -> bool:
    return isinstance(m, FakeQuantMixin) and bool(m.quant_output) and m._observers is None


@torch.no_grad()
def tie_layer_inputs(model: nn.Module, run: Callable[[], object]) -> list[tuple[str, str]]:
    """Run ``run()`` (one forward of ``model``) with hooks that follow each quantized output through
    pass-through modules; every calibrated fake-quant layer whose input is such an output, in the same
    activation scheme, gets the producer's ``output_scale_`` / ``output_zero_point_`` as its input
    qparams. Returns the (consumer, producer) module names whose input qparams this changed (the
    others already matched), in call order."""
    names = {m: n for n, m in model.named_modules()}
    source: dict[int, nn.Module] = {}   # id(tensor) -> the quantized layer whose output codes it holds
    keep: list[torch.Tensor] = []       # the tensors behind those ids, alive until the pass ends
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def after(m: nn.Module, args: tuple, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if _produces_codes(m):
            src = m
        elif args and isinstance(args[0], torch.Tensor) and id(args[0]) in source:
            src = source[id(args[0])]
            if not (_passes(m) or _clamps_nothing(m, src)):
                return
        else:
            return
        if src is not None:
            source[id(out)] = src
            keep.append(out)

    def before(m: nn.Module, args: tuple) -> None:
        src = source.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and src is not m and m._observers is None and src.ascheme == m.ascheme \
                and (m, src) not in pairs:
            pairs.append((m, src))

    handles = [m.register_forward_hook(after) for m in model.modules()
               if _produces_codes(m) or _passes(m) or type(m) in (nn.ReLU, nn.ReLU6)]
    handles += [m.register_forward_pre_hook(before) for m in model.modules() if isinstance(m, FakeQuantMixin)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    changed = []
    for m, src in pairs:
        if not (torch.equal(m.input_scale_, src.output_scale_)
                and torch.equal(m.input_zero_point_, src.output_zero_point_)):
            changed.append((names.get(m, "?"), names.get(src, "?")))
        m.input_scale_.copy_(src.output_scale_)
        m.input_zero_point_.copy_(src.output_zero_point_)
    return changed
