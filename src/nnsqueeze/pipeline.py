"""The pipeline runner: recipe -> steps -> measured, exported :class:`CompressionResult`.

    import nnsqueeze as nsq
    result = nsq.compress(model, "prune-int8", train_data=train, calib_data=calib,
                          eval_data=test, metric="accuracy")
    result.report.print()
    result.save("out/")

The runner knows no technique: it validates inputs, measures the baseline, runs each registered
step with an explicit :class:`Context`, exports, verifies, and measures again.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import artifact
from .context import Context
from .data import as_batches, call_model, describe, shapes, split, stage, take, to_device
from .env import environment
from .errors import DataError, ModelError, NnsqueezeError, RecipeError
from .isa import describe as isa_describe
from .evaluate import latency_batch, measure
from .guard import GuardInputs
from .metrics import checked, get_metric, lower_is_better
from .recipe import Recipe, load_recipe
from .registry import EXPORTERS, GUARDS, STEPS
from .report import Report, ReportBuilder
from .steps.base import Step

log = logging.getLogger("nnsqueeze")


@dataclass
class CompressionResult:
    model: nn.Module
    report: Report
    recipe: Recipe
    records: list[dict[str, Any]] = field(default_factory=list)
    onnx: bytes | None = None
    example_inputs: Any = None

    def manifest(self) -> dict[str, Any]:
        from . import __version__

        return {
            "format_version": artifact.manifest_version(self.records), "nnsqueeze_version": __version__,
            "recipe": self.recipe.to_dict(), "steps": self.records, "layers": self.report.get("layers", {}),
            "files": {"weights": artifact.WEIGHTS, "onnx": "model.onnx" if self.onnx else None},
            # the CPU kernel class reduce_range 'auto' and the ORT parity check assumed (see nnsqueeze.isa)
            "isa": self.report.get("environment", {}).get("isa") or isa_describe(),
        }

    def save(self, out: str | Path, format: str | None = None, tokenizer: Any = None, overwrite: bool = False,
             **options: Any) -> Path:
        """Write the artifact directory (see :mod:`nnsqueeze.artifact`).

        A new or empty ``out`` appears whole by one rename; a non-empty one raises ArtifactError
        unless ``overwrite``, which replaces only the artifact's own files and keeps the rest.

        ``format`` (``"compressed-tensors"``, ``"gptq"``, ``"gguf"``): instead, a packed causal LM as a
        checkpoint other loaders open, with ``tokenizer``'s files and the run's ``nnsqueeze_report.json``,
        ``nnsqueeze_report.md`` and ``nnsqueeze_recipe.yaml``; see
        :func:`nnsqueeze.export.hf_formats.save_pretrained` (``options`` go there).
        """
        import json

        if format is not None:
            from .export.hf_formats import save_pretrained

            extra = {"nnsqueeze_report.json": self.report.to_json(), "nnsqueeze_report.md": self.report.to_markdown(),
                     "nnsqueeze_recipe.yaml": self.recipe.to_yaml()}
            return save_pretrained(self.model, out, format=format, tokenizer=tokenizer, overwrite=overwrite,
                                   extra=extra, **options)
        artifact.check_out(out, overwrite)  # before the (possibly large) files are serialized
        files: dict[str, bytes | str] = {
            artifact.WEIGHTS: artifact.weights_bytes(self.model),
            artifact.MANIFEST: json.dumps(self.manifest(), indent=2),
            "recipe.yaml": self.recipe.to_yaml(),
            "report.json": self.report.to_json(),
            "report.md": self.report.to_markdown(),
        }
        if self.onnx is not None:
            files["model.onnx"] = self.onnx
        return artifact.write_dir(out, files, overwrite=overwrite)


@dataclass
class Checkpoint:
    """A model part-way through a recipe: its state after the first ``done`` steps.

    ``compress(..., on_step=fn)`` hands one to ``fn`` after every step; ``compress(..., start=cp)``
    skips the first ``cp.done`` steps of the same recipe and continues from ``cp.model`` (the
    baseline is still measured on the original model, which also stays the distillation teacher).
    ``report`` holds the report entries the done steps made (steps, layers, skipped, notes);
    ``pending`` counts training callbacks those steps left for a later step (e.g. gradual
    pruning): such a point cannot be resumed from, since the callbacks live only in this run.
    nnsqueeze.search uses this to share the work of common recipe prefixes between trials.
    """

    model: nn.Module
    done: int
    records: list[dict[str, Any]]
    report: dict[str, Any]
    rng: torch.Tensor | None = None
    pending: int = 0
    baseline: dict[str, Any] = field(default_factory=dict)


def _check_start(start: Checkpoint, recipe: Recipe) -> None:
    names = [e.name for e in recipe.steps]
    if not 0 < start.done < len(names) or [r.get("name") for r in start.records] != names[:start.done]:
        raise RecipeError("start", f"the checkpoint (after {start.done} step(s): "
                          f"{[r.get('name') for r in start.records]}) is not a prefix of the recipe {names}",
                          fix="resume only from a checkpoint of the same recipe's first steps")
    if start.pending:
        raise RecipeError("start", f"the checkpoint after step {start.done} left {start.pending} training "
                          "callback(s) for a later step; it cannot be resumed from", fix="start from the beginning")


def check_model(model: Any) -> None:
    if isinstance(model, torch.jit.ScriptModule):  # script and trace: no Python layers to select or swap
        raise ModelError("model", f"TorchScript models are not supported (got a {type(model).__name__})",
                         fix="pass the original nn.Module, before torch.jit.script/trace")
    if not isinstance(model, nn.Module):
        raise ModelError("model", f"expected a torch.nn.Module, got {type(model).__name__}",
                         fix="pass the model instance, e.g. MyNet() with its weights loaded")
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [name for name, p in tensors if p.is_meta]
    if meta:
        raise ModelError(f"model.{meta[0]}", f"weights are on the meta device ({len(meta)} tensor(s)): they hold "
                         "no values", fix="load real weights first (e.g. model.load_state_dict(..., assign=True) "
                         "or from_pretrained without device_map='meta')")
    for name, p in tensors:
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelError(f"model.{name}", "holds NaN or inf values",
                             fix="check the training run or the weights file that produced it")


def _first_inputs(*datas: Iterable | None) -> Any:
    for d in datas:
        if d is not None:
            return split(next(iter(d)))[0]
    return None


def _probe(model: nn.Module, inputs: Any, where: str) -> None:
    """Run the model once so that shape mismatches fail now, with a clear message."""
    model.eval()
    try:
        with torch.inference_mode():
            out = call_model(model, inputs)
    except ModelError as e:  # the user's model fails on the first batch: most often the data's shape
        cause = e.__cause__ or e
        raise DataError(where, f"the model fails on inputs of shape {shapes(inputs)}: {describe(cause)}",
                        fix="check that the data matches the model's expected input shape") from cause
    from .data import logits

    try:
        t = logits(out, strict=False)
    except NnsqueezeError:
        return
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ModelError("model output", "the model produces NaN or inf on the example inputs",
                         fix="check the weights and the input normalisation")


def make_steps(recipe: Recipe, model: nn.Module | None = None) -> list[Step]:
    steps = [STEPS.get(e.name)(e.config, i) for i, e in enumerate(recipe.steps)]
    for i, s in enumerate(steps):
        if getattr(s, "requires_training", False) and not any(getattr(t, "trains", False) for t in steps[i + 1:]):
            raise RecipeError(f"steps[{i}].{s.registered_name}", "needs a training step after it "
                              "(e.g. a gradual schedule runs during fine-tuning)",
                              fix="add '- finetune: {...}' after it or use schedule: oneshot")
    check_order(steps, model)
    if recipe.export.onnx is not None:  # refused now, not after every step has run
        for s in steps:
            why = s.onnx_limit()
            if why is not None:
                raise RecipeError(f"{s.where}", f"{why}; the recipe exports ONNX (export.onnx)",
                                  fix="set 'export: {onnx: null}' to keep the simulated model and its artifact only, "
                                  "or use a format ONNX Runtime runs (fp8-e4m3, fp8-e5m2, int)")
    return steps


def _reach(step: Step, model: nn.Module) -> list[str] | None:
    """Module names ``step`` may change on ``model``, from its targets/ignore; None when unknown
    (no targets, or options such as ``ops`` that act beyond the selected layers)."""
    from .errors import TargetError
    from .targets import select

    cfg = step.config
    targets = list(getattr(cfg, "targets", None) or step.default_targets)
    if not targets or getattr(cfg, "ops", None) or getattr(cfg, "attention", None):
        return None
    try:  # the step's own selection rule, without its layer-type filter
        return select(model, targets, list(getattr(cfg, "ignore", None) or []), strict=False).names
    except TargetError:  # a malformed pattern: the step reports it when it runs
        return None


def _overlap(a: list[str] | None, b: list[str] | None) -> bool:
    if a is None or b is None:
        return True
    return any(x == y or x.startswith(y + ".") or y.startswith(x + ".") for x in a for y in b)


def check_order(steps: list[Step], model: nn.Module | None = None) -> None:
    """Reject, before any step runs, an order that cannot work, from the steps' declared flags
    (:class:`~nnsqueeze.steps.base.Step`): a step that needs float layers after one that quantized
    them (quantize twice, prune after quantize...), or training after a step whose layers cannot train.

    Given the model, a step that needs float layers may follow a quantizing step whose targets
    select other modules (e.g. ``quantize-dynamic`` on Linear layers, then ``quantize`` on Conv1d)."""
    quantized: list[Step] = []
    for b in steps:
        for a in quantized:
            if getattr(b, "needs_float", False) and (
                    model is None or _overlap(_reach(a, model), _reach(b, model))):
                fix = (f"put {b.registered_name} before {a.registered_name}"
                       if not getattr(b, "quantizes", False) else
                       "quantize once: one step with per-layer settings (targets/ignore, layer_weights), the "
                       "'mixed' step for several formats, or disjoint targets in each step")
                raise RecipeError(f"{b.where}", f"cannot run after {a.where}: {b.registered_name} needs float "
                                  f"layers and {a.registered_name} has already quantized them", fix=fix)
            if getattr(b, "trains", False) and not getattr(a, "trainable_after", True):
                raise RecipeError(f"{b.where}", f"cannot train after {a.where}: the layers "
                                  f"{a.registered_name} leaves (fixed integer codes or fp16 weights) do not train",
                                  fix=f"put {b.registered_name} before {a.registered_name} (train, then quantize), "
                                  "or use '- qat: {...}' then '- finetune: {...}' for quantization-aware training")
        if getattr(b, "quantizes", False):
            quantized.append(b)


def compress(
    model: nn.Module,
    recipe: Recipe | str | Path | dict | list,
    *,
    train_data: Iterable | None = None,
    calib_data: Iterable | None = None,
    eval_data: Iterable | None = None,
    metric: str | Callable | None = "accuracy",
    example_inputs: Any = None,
    loss_fn: Callable | None = None,
    teacher: nn.Module | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    start: Checkpoint | None = None,
    on_step: Callable[[Checkpoint, Context], None] | None = None,
    baselines: dict | None = None,
) -> CompressionResult:
    """Run ``recipe`` on a copy of ``model`` (the original is left untouched) and measure both.

    ``on_step(checkpoint, ctx)`` is called after every step (it may raise to stop the run);
    ``start`` continues from a :class:`Checkpoint` of this recipe's first steps instead of
    running them again. ``baselines``: a dict the caller keeps between calls on the *same model
    and data* (a search's trials): the baseline's ONNX export and figures are measured once per
    evaluation/export setting and reused from it (the report notes the reuse)."""
    recipe = load_recipe(recipe)
    steps = make_steps(recipe, model if isinstance(model, nn.Module) else None)  # fails before data is read
    if start is not None:
        _check_start(start, recipe)
    train_data = as_batches(train_data, "train_data", refuse_nan=True)
    calib_data = as_batches(calib_data, "calib_data", refuse_nan=True)
    eval_data = as_batches(eval_data, "eval_data", refuse_nan=True)
    metric_fn, metric_name = get_metric(metric)
    if metric_fn is not None and eval_data is None:
        if callable(metric):  # the user wrote a metric: ignoring it would be a silent surprise
            raise DataError("eval_data", f"metric {metric_name!r} was given but no eval_data to measure it on",
                            fix="pass eval_data=... (batches of (inputs, targets)) or metric=None")
        metric_fn = None  # the default metric without eval data: nothing is measured, and the report says so
    if metric_fn is not None:
        metric_fn = checked(metric_fn, metric_name)
    if any(getattr(s, "trains", False) for s in steps) and train_data is None:
        i = next(i for i, s in enumerate(steps) if getattr(s, "trains", False))
        raise DataError("train_data", f"steps[{i}].{steps[i].registered_name} trains but no train_data was given",
                        fix="pass train_data=... (batches of (inputs, targets)) or remove the training step")
    check_model(model)
    if example_inputs is None:
        example_inputs = _first_inputs(calib_data, train_data, eval_data)
    if example_inputs is None:
        raise DataError("example_inputs", "no example inputs and no data to take them from",
                        fix="pass example_inputs=... or calib_data=...")
    device = torch.device(device)
    example_inputs = to_device(example_inputs, device)
    original = model
    work = copy.deepcopy(model).to(device)
    with stage("example_inputs"):
        _probe(work, example_inputs, "example_inputs")

    torch.manual_seed(recipe.seed)
    ev = recipe.evaluate
    rb = ReportBuilder()
    rb.environment = environment(ev.threads)
    ctx = Context(train_data=train_data, calib_data=calib_data, eval_data=eval_data,
                  example_inputs=example_inputs, metric=metric_fn, metric_name=metric_name, loss_fn=loss_fn,
                  device=device, seed=recipe.seed, teacher=teacher or original, report=rb, progress=progress)
    if metric_name is not None and metric_fn is None:
        rb.note("metric", f"no eval_data: the metric ({metric_name}) is not measured")
    lat_inputs = latency_batch(eval_data or calib_data or train_data, ev.latency_batch) \
        if (eval_data or calib_data or train_data) is not None else example_inputs
    samples = [split(b)[0] for b in take(eval_data or calib_data or [example_inputs], 256)][:4]
    onnx_cfg = recipe.export.onnx
    measured = {"latency_batch": _batch_size(lat_inputs), "threads": ev.threads, "runs": ev.runs,
                "warmup": ev.warmup, "metric": metric_name}
    if lower_is_better(metric_fn):  # e.g. perplexity: the report's change column reads it
        measured["lower_is_better"] = True

    with tempfile.TemporaryDirectory(prefix="nnsqueeze-") as tmp:
        exporter = EXPORTERS.get("onnx") if onnx_cfg is not None else None
        base_onnx = None
        key = json.dumps([ev.model_dump(mode="json"), None if onnx_cfg is None else onnx_cfg.model_dump(mode="json"),
                          metric_name, measured["latency_batch"], str(device)], sort_keys=True, default=str)
        with stage("baseline"):
            if exporter is not None:
                base_onnx = str(Path(tmp) / "baseline.onnx")
            if baselines is not None and key in baselines:  # the same model, data and settings: measured once
                figures, export_info, onnx_bytes = copy.deepcopy(baselines[key])
                if base_onnx is not None:
                    Path(base_onnx).write_bytes(onnx_bytes)
                    rb.export["baseline"] = export_info
                rb.baseline = figures
                rb.note("baseline", "baseline figures reused from an earlier run on the same model, data and "
                        "settings (measured once)")
            else:
                if exporter is not None:
                    rb.export["baseline"] = exporter(work, base_onnx, example_inputs, opset=onnx_cfg.opset,
                                                     verify=onnx_cfg.verify, samples=samples)
                rb.baseline = measure(work, eval_data=eval_data, metric=metric_fn, latency_inputs=lat_inputs,
                                      threads=ev.threads, warmup=ev.warmup, runs=ev.runs, onnx_path=base_onnx,
                                      budget_s=ev.latency_budget_s,
                                      archive_bytes=len(artifact.weights_bytes(work)),
                                      torch_latency=ev.torch_latency)
                if baselines is not None:
                    baselines[key] = copy.deepcopy((rb.baseline, rb.export.get("baseline"),
                                                    Path(base_onnx).read_bytes() if base_onnx else None))
        rb.baseline["measured"] = measured
        records: list[dict[str, Any]] = []
        first_note = len(rb.notes)  # notes before this index are the run's own, not the steps'
        if start is not None:  # the first steps' model, records and report entries, as they left them
            work, records = start.model.to(device), copy.deepcopy(start.records)
            part = copy.deepcopy(start.report)
            rb.steps.extend(part.get("steps", []))
            rb.layers.update(part.get("layers", {}))
            rb.skipped.extend(part.get("skipped", []))
            rb.notes.extend(part.get("notes", []))
            if start.rng is not None:
                torch.set_rng_state(start.rng)
        for step, entry in list(zip(steps, recipe.steps))[start.done if start is not None else 0:]:
            log.info("step %d: %s", step.index, entry.name)
            rb.begin_step(entry.name, entry.config.model_dump(mode="json"))
            t0 = time.perf_counter()
            with stage(step.where):
                work = step.run(work, ctx)
                fields: dict[str, Any] = {"seconds": time.perf_counter() - t0}
                check_model(work)
                if metric_fn is not None and ev.per_step:
                    with torch.inference_mode():
                        fields["accuracy"] = metric_fn(work, eval_data)
                    rb.step(accuracy=fields["accuracy"])
            rb.end_step(**fields)
            records.append({"name": entry.name, "config": entry.config.model_dump(mode="json"),
                            "record": step.record()})
            if on_step is not None:
                part = {"steps": rb.steps, "layers": rb.layers, "skipped": rb.skipped, "notes": rb.notes[first_note:]}
                on_step(Checkpoint(work, step.index + 1, records, part, torch.get_rng_state(), len(ctx.callbacks),
                                   rb.baseline), ctx)
        work.eval()
        onnx_bytes, comp_onnx = None, None
        with stage("compressed"):
            if exporter is not None:
                comp_onnx = str(Path(tmp) / "model.onnx")
                rb.export["compressed"] = exporter(work, comp_onnx, example_inputs, opset=onnx_cfg.opset,
                                                   verify=onnx_cfg.verify, samples=samples, atol=onnx_cfg.atol)
                onnx_bytes = Path(comp_onnx).read_bytes()
            else:
                rb.note("export", "ONNX export disabled by the recipe (export.onnx: null)")
            rb.compressed = measure(work, eval_data=eval_data, metric=metric_fn, latency_inputs=lat_inputs,
                                    threads=ev.threads, warmup=ev.warmup, runs=ev.runs, onnx_path=comp_onnx,
                                    budget_s=ev.latency_budget_s,
                                    archive_bytes=len(artifact.weights_bytes(work)), torch_latency=ev.torch_latency)
        rb.compressed["measured"] = measured
        _note_budget(rb, ev)
        if base_onnx is not None and comp_onnx is not None:
            inputs = GuardInputs(recipe=recipe, report=rb, ctx=ctx, exporter=exporter, samples=samples,
                                 latency_inputs=lat_inputs, eval_data=eval_data, metric=metric_fn, tmp=Path(tmp),
                                 original=original, base_onnx=base_onnx, measure=measure)
            with stage("latency-guard"):
                out = GUARDS.get("latency")().run(work, onnx_bytes, inputs)
            # a guard appends its own record; it never edits the steps' records, which go only
            # when the guard kept none of their changes (the fp32 model)
            work, onnx_bytes = out.model, out.onnx
            records = (records if out.keeps_steps else []) + ([out.record] if out.record is not None else [])
    _flag_regressions(rb)
    report = rb.build()
    _log_summary(report)
    return CompressionResult(model=work, report=report, recipe=recipe, records=records, onnx=onnx_bytes,
                             example_inputs=example_inputs)


def _flag_regressions(rb: ReportBuilder) -> None:
    """A compressed model that is slower or larger than the baseline is said so, never hidden."""
    b, c = rb.baseline, rb.compressed
    bl, cl = b["latency_ms"].get("onnxruntime"), c["latency_ms"].get("onnxruntime")
    if bl is not None and cl is not None and cl > bl:
        rb.note("evaluate", f"the compressed ONNX model is slower than the baseline in ONNX Runtime "
                f"({cl:.4g} ms vs {bl:.4g} ms at batch {b['measured']['latency_batch']})")
    if "size_bytes" in b and "size_bytes" in c and c["size_bytes"] > b["size_bytes"]:
        rb.note("evaluate", f"the compressed ONNX file is larger than the baseline ({c['size_bytes']} vs "
                f"{b['size_bytes']} bytes); see archive_bytes for the weight archive")
    for n in rb.notes:
        if n["step"] == "evaluate":
            log.warning(n["note"])


def _note_budget(rb: ReportBuilder, ev: Any) -> None:
    """Latency figures timed with fewer runs than the recipe asks (``evaluate.latency_budget_s``) say so."""
    cut = [f"{which} {rt}: {n} runs" for which, figs in (("baseline", rb.baseline), ("compressed", rb.compressed))
           for rt, n in (figs or {}).get("latency_runs", {}).items() if n < ev.runs]
    if cut:
        rb.note("latency", f"one call took longer than latency_budget_s ({ev.latency_budget_s:g} s) allows for "
                f"{ev.warmup} warm-up + {ev.runs} runs, so fewer were timed ({'; '.join(cut)}; 1 warm-up each); "
                "set evaluate.latency_budget_s: null for all of them")


def _batch_size(inputs: Any) -> int | None:
    t = next(iter(inputs.values())) if isinstance(inputs, dict) else (
        inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else None


def _log_summary(report: Report) -> None:
    for key, b, c, r in report.summary_rows():
        log.info("%s: %s -> %s (%s)", key, b, c, r)
