"""Pre-flight of the open-format exports: whether a recipe's result fits a format, checked on the
float model *before* the (long) compression runs, with the same ExportErrors the exporters raise
after it and the nearest scheme that fits.

    >>> from nnsqueeze.export.hf_formats import check_recipe
    >>> from nnsqueeze.llm.tiny import TinyLlama, TinyLlamaConfig
    >>> model = TinyLlama(TinyLlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=1))
    >>> check_recipe(model, "w4-g128-gptq", "compressed-tensors")
    Traceback (most recent call last):
    ...
    nnsqueeze.errors.ExportError: steps[0].gptq.group_size: group_size 128 does not divide the inputs of 7 selected
    layers (64, 96): compressed-tensors has no shorter last group
      fix: group_size 32 divides every selected layer's inputs (64, 96): use group_size 32, or uneven_groups: smaller (a
    smaller group for those layers only)
    >>> check_recipe(model, [{"gptq": {"bits": 4, "group_size": 32, "pack": True}}], "compressed-tensors")  # fits

:func:`fit_groups` sets ``uneven_groups: smaller`` for compressed-tensors where a step does not say (the
CLI's ``--format`` calls it before :func:`check_recipe`, and logs what it changed).

What is checked, per packing step (``rtn``/``gptq`` with ``pack: true``, ``awq`` with ``pack: true``)
and the layers it selects (``targets``/``ignore``; a layer packed by an earlier step is not packed
again): whole groups (all formats), ``scale_dtype: fp16`` (``gptq``, ``gguf``: they store float16
scales), one scheme per checkpoint and word-aligned sizes (``gptq``), symmetric int4/int8 in groups
of 32 without bias on a LLaMA model (``gguf``), ``share_scales: true`` and whole q/k/v and gate/up
groups (``awq``: its scales fold into the ops before the layers). For compressed-tensors, a
``quantize`` step with a float format instead (``float-quantized``): FP8 E4M3 weights and
activations (E5M2 and the MX / NVFP4 block formats are refused), Linear layers, no FP8 ``lm_head``
tied to the embedding; one form per checkpoint (no packing step beside it). A ``rotate`` step with
``online_hadamard: true`` (a run-time hook no format can express) and steps that leave other layer
types (e.g. ``quantize``, ``smoothquant``) are refused; a recipe that packs nothing too, except a
pruning-only recipe for compressed-tensors (its ``dense`` form, :mod:`.ct_sparse`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import ExportError
from ..ops.rtn import smaller_group

# The open formats :func:`nnsqueeze.export.hf_formats.save_pretrained` writes (one exporter module each).
# Here, below hf_formats, which imports this module: the pre-flight needs the names, not the writers.
FORMATS = ("compressed-tensors", "gptq", "gguf")

PACKING = ("rtn", "gptq", "awq")
# steps whose result the formats hold: float-to-float transforms and pruning (zeros in float weights)
PRUNING = ("sparsegpt", "wanda", "prune", "nm-prune")
FLOAT_STEPS = ("rotate", *PRUNING)


class _Quiet:
    """A stand-in Context for layer selection: skipped layers are not reported."""

    def skip(self, *args: Any) -> None:
        pass


def _layers(step: Any, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers ``step`` would pack, as its run selects them (rtn also takes named layers outside
    the blocks)."""
    from ..errors import TargetError

    outside = step.named_outside(model) if step.registered_name == "rtn" else []
    try:
        inside = step.block_layers(model, _Quiet())
    except TargetError:
        if not outside:
            raise
        inside = []
    return list(dict(inside + outside).items())


def _in_features(m: nn.Module) -> int:
    return int(m.in_features) if isinstance(m, nn.Linear) else int(m.weight.shape[0])   # Conv1D: (in, out)


def _out_features(m: nn.Module) -> int:
    return int(m.out_features) if isinstance(m, nn.Linear) else int(m.weight.shape[1])


def nearest_group(sizes: list[int], wanted: int) -> str:
    """The largest packable group size (a power of two >= 16, at most ``wanted``) dividing every size."""
    fit = smaller_group(math.gcd(*sizes), wanted)
    shown = ", ".join(map(str, sorted(set(sizes))))
    if fit is None:
        return f"use group_size: null (one scale per row): no power-of-two group >= 16 divides ({shown})"
    return f"group_size {fit} divides every selected layer's inputs ({shown}): use group_size {fit}"


def check_recipe(model: nn.Module, recipe: Any, format: str) -> None:
    """Raise the ExportError that exporting ``recipe``'s result in ``format`` would raise, before the
    run; see the module docstring. ``recipe``: anything :func:`nnsqueeze.recipe.load_recipe` takes."""
    from ..recipe import load_recipe
    from ..registry import STEPS

    if format not in FORMATS:
        raise ExportError("format", f"unknown format {format!r}", fix=f"use one of: {', '.join(FORMATS)}")
    r = load_recipe(recipe)
    cfg = getattr(model, "config", None)
    if format == "gguf" and getattr(cfg, "model_type", None) != "llama":
        raise ExportError(format, f"GGUF export supports the LLaMA architecture, not "
                          f"{getattr(cfg, 'model_type', type(model).__name__)!r}",
                          fix="use format compressed-tensors or gptq for this model")
    packed: dict[str, tuple[str, Any, nn.Module]] = {}   # layer -> (where, config, module)
    fp8: list[str] = []                                    # the FP8 quantize steps (compressed-tensors)
    for i, entry in enumerate(r.steps):
        where, c = f"steps[{i}].{entry.name}", entry.config
        if entry.name == "rotate":
            if c.online_hadamard:
                raise ExportError(f"{where}.online_hadamard", f"the online Hadamard hook on down_proj's input is a "
                                  f"run-time op that {format} cannot express", fix="use online_hadamard: false")
            continue
        if entry.name in FLOAT_STEPS or (entry.name in PACKING and not c.pack):
            continue
        if entry.name == "quantize" and format == "compressed-tensors" and c.weights.format != "int":
            fp8.append(where)
            _check_fp8(where, STEPS.get(entry.name)(c, i), model, bool(getattr(cfg, "tie_word_embeddings", False)))
            continue
        if entry.name not in PACKING:
            raise ExportError(where, f"{format} holds packed weight-only layers (rtn/gptq/awq with pack: true) and "
                              f"float layers; step {entry.name!r} leaves layers it cannot hold",
                              fix="drop the step, or save an nnsqueeze artifact (no --format)")
        step = STEPS.get(entry.name)(c, i)
        for n, m in _layers(step, model):
            packed.setdefault(n, (where, c, m))
        if entry.name == "awq":
            _check_awq(where, c, [n for n, (w, _, _) in packed.items() if w == where])
    if fp8 and packed:
        raise ExportError(fp8[0], f"the recipe makes FP8 layers and packed int layers, and nnsqueeze writes one "
                          f"{format} form per checkpoint", fix="quantize every layer the same way")
    if fp8:
        return
    if not packed and format == "compressed-tensors" and any(e.name in PRUNING for e in r.steps):
        return   # a pruned float model: compressed-tensors' dense form (export/ct_sparse.py)
    if not packed:
        also = " (or FP8 layers: quantize with fp8-e4m3)" if format == "compressed-tensors" else ""
        raise ExportError("recipe", f"no step packs weights, and {format} stores packed weight-only layers{also}",
                          fix="add a step like `rtn: {bits: 4, group_size: 128}` or `gptq: {..., pack: true}`")
    by_step: dict[str, list[tuple[str, Any, nn.Module]]] = {}
    for n, (where, c, m) in packed.items():
        by_step.setdefault(where, []).append((n, c, m))
    schemes = {(c.bits, c.group_size, c.symmetric) for _, c, _ in packed.values()}
    for where, items in by_step.items():
        _check_step(where, items, format, len(schemes))


def _check_fp8(where: str, step: Any, model: nn.Module, tied: bool) -> None:
    """A ``quantize`` step with a float format, for compressed-tensors' float-quantized form: FP8 E4M3
    weights and activations, Linear layers only, no FP8 lm_head tied to the embedding."""
    from .ct_float import check_float_args

    c = step.config
    gran = c.weights.granularity if c.weights.granularity in ("per-tensor", "per-channel") else "per-channel"
    acts = c.activations.args(c.calibration.method) if c.activations.format != "none" else None
    check_float_args(f"{where}.weights.format" if c.weights.format != "fp8-e4m3" else f"{where}.activations.format",
                     c.weights.args(), acts,
                     fix=f"{step.registered_name}: {{weights: {{format: fp8-e4m3, granularity: {gran}}}}}")
    for n, m in step.select(model, None, supported=(nn.Linear, nn.Conv1d, nn.Conv2d)).layers:   # quantize's
        if type(m) in (nn.Conv1d, nn.Conv2d):   # (a Linear subclass is skipped by the run, not quantized)
            raise ExportError(f"{where}.targets", f"selects {n}, a {type(m).__name__}; compressed-tensors' schemes "
                              "target Linear layers", fix="use targets: [Linear]")
        if tied and n == "lm_head":
            raise ExportError(f"{where}.targets", "selects lm_head, whose weight is tied to the (float) input "
                              "embedding, which compressed-tensors stores once", fix="add ignore: [lm_head]")


def _check_awq(where: str, c: Any, names: list[str]) -> None:
    from ..llm.awq import siblings

    if not c.share_scales:
        raise ExportError(f"{where}.share_scales", "AWQ's input scales must fold into the ops before the layers, "
                          "and per-layer scales do not (q/k/v read one norm)", fix="set share_scales: true")
    chosen = set(names)
    for n in names:
        missing = [s for s in siblings(n) if s not in chosen]
        if missing:
            raise ExportError(f"{where}.targets", f"{n} is selected and {missing[0]}, which reads the same input, "
                              "is not: their scales cannot fold into the shared op before them",
                              fix="select (or ignore) q/k/v together and gate/up together")


FP16_SCALES = ("fp16", "fp16-exact")  # both store float16 scales


def _check_step(where: str, items: list[tuple[str, Any, nn.Module]], fmt: str, n_schemes: int) -> None:
    c = items[0][1]
    g, ins = c.group_size, [_in_features(m) for _, _, m in items]
    if fmt == "gguf":
        fit = f"{where.split('.')[-1]}: {{bits: {4 if c.bits <= 4 else 8}, group_size: 32, symmetric: true, " \
              "scale_dtype: fp16}"
        if c.bits not in (4, 8) or not c.symmetric or g != 32 or c.scale_dtype not in FP16_SCALES:
            scheme = f"int{c.bits} {'per-row' if g is None else f'g{g}'} " \
                     f"{'symmetric' if c.symmetric else 'asymmetric'} {c.scale_dtype} scales"
            raise ExportError(where, f"GGUF's Q4_0/Q8_0 are symmetric with groups of 32 and float16 scales; this "
                              f"step is {scheme}", fix=f"quantize with `{fit}`")
        for n, _, m in items:
            if getattr(m, "bias", None) is not None:
                raise ExportError(n, "has a bias, which llama GGUF files do not hold", fix="export a LLaMA model")
    if fmt in ("gptq", "gguf") and g is not None and len({c.group_for(k) for k in ins}) > 1:
        raise ExportError(f"{where}.uneven_groups", f"uneven_groups: smaller gives these layers several group "
                          f"sizes and {fmt} holds one", fix="use a group_size dividing every layer's inputs")
    if fmt == "gptq":
        if n_schemes > 1:
            raise ExportError(where, "gptq holds one scheme per checkpoint and the recipe's packing steps use "
                              f"{n_schemes}", fix="quantize every layer with the same bits/group_size/symmetric")
        if c.scale_dtype not in FP16_SCALES:
            raise ExportError(f"{where}.scale_dtype", f"gptq stores float16 scales and this step chooses codes "
                              f"against {c.scale_dtype} scales", fix="set scale_dtype: fp16 (or fp16-exact: "
                              "every dequantized weight an fp16 value too, for loaders that dequantize in fp16)")
        per = 32 // c.bits
        for n, _, m in items:
            if _in_features(m) % per or _out_features(m) % per:
                raise ExportError(n, f"{_in_features(m)} inputs / {_out_features(m)} outputs: GPTQ packs {per} "
                                  f"int{c.bits} codes per int32 word without padding", fix=f"ignore {n} in {where}")
    if g is not None:
        bad = sorted({k for k in ins if k % g})
        if bad and (fmt != "compressed-tensors" or c.uneven_groups == "short"):
            also = "" if fmt != "compressed-tensors" else ", or uneven_groups: smaller (a smaller group for those " \
                "layers only)"
            one = "" if fmt == "compressed-tensors" else " and one group size per checkpoint"
            raise ExportError(f"{where}.group_size", f"group_size {g} does not divide the inputs of "
                              f"{sum(k % g != 0 for k in ins)} selected layers ({', '.join(map(str, bad))}): {fmt} "
                              f"has no shorter last group{one}", fix=nearest_group(ins, g) + also)
        for k in bad:
            c.group_for(k)   # a width no smaller group fits: the RecipeError now, before the run


def fit_groups(model: nn.Module, recipe: Any, format: str) -> list[str]:
    """For compressed-tensors (no shorter last group, one scheme per layer group): each packing step of
    ``recipe`` (a loaded :class:`~nnsqueeze.recipe.Recipe`, changed in place) whose ``group_size`` leaves
    a shorter last group on some selected layer, and that does not set ``uneven_groups`` itself, gets
    ``uneven_groups: smaller``. Returns one message per changed step, to log; the run then reports each
    layer whose group changed. Other formats hold one group size and are left to :func:`check_recipe`."""
    from ..registry import STEPS

    if format != "compressed-tensors":
        return []
    out = []
    for i, entry in enumerate(recipe.steps):
        c = entry.config
        if entry.name not in PACKING or not c.pack or c.group_size is None or "uneven_groups" in c.model_fields_set:
            continue
        ins = [_in_features(m) for _, m in _layers(STEPS.get(entry.name)(c, i), model)]
        bad = sorted({k for k in ins if k % c.group_size})
        if not bad:
            continue
        entry.config = c.model_copy(update={"uneven_groups": "smaller"})
        groups = ", ".join(f"{k} inputs: group_size {entry.config.group_for(k)}" for k in bad)
        out.append(f"steps[{i}].{entry.name}: group_size {c.group_size} does not divide the inputs of "
                   f"{sum(k % c.group_size != 0 for k in ins)} layers and {format} has no shorter last group, so "
                   f"those layers get a smaller group ({groups}); the rest keep {c.group_size}. Set uneven_groups: "
                   "short in the recipe to refuse instead")
    return out
