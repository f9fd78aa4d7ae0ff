"""Step ``finetune``: a plain supervised training loop that keeps pruning masks and runs callbacks.

Recipe::

    steps:
      - prune: {sparsity: 0.6, schedule: gradual}
      - finetune: {epochs: 3, lr: 1.0e-3, optimizer: adamw, schedule: cosine, grad_clip: 1.0}

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.finetune import Finetune
    >>> g = torch.Generator().manual_seed(0)
    >>> data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    >>> ctx = Context(train_data=data, progress=False); ctx.report.begin_step("finetune", {})
    >>> model = Finetune(Finetune.Config(steps=6, lr=1e-2)).run(nn.Linear(4, 3), ctx)
    >>> ctx.report.steps[-1]["figures"]["steps"]
    6

Loss, in this order: ``ctx.loss_fn(output, targets)`` if given; the model's own ``output.loss`` for
dict batches (Hugging Face style, ``labels`` inside the batch); else cross-entropy of the output's
logits against the batch targets.

Each optimizer step: forward, loss (non-finite -> :class:`DataError` if the batch itself is
non-finite, else :class:`ModelError`, both naming the step), backward, zero the gradients of pruned
weights, clip, step, re-apply every ``weight_mask`` (so pruned weights stay exactly zero under
AdamW/weight decay/momentum), LR schedule, then ``cb.on_step_end(model, step, total)`` for each
``ctx.callbacks`` entry (``on_train_begin``/``on_train_end`` around the loop; always the unwrapped model).

Augmentation (off by default): ``shift: n`` rolls each sample of a tensor input (``(inputs, targets)``
batches) circularly along its last axis by its own random offset in ``[-n, n]`` before the forward
(and before the teacher's forward in ``distill``, which sees the same shifted inputs); the offsets
come from a generator seeded by the recipe's seed. It is the augmentation the MNIST-1D demo models
are trained with; without it, long fine-tuning of such a model overfits the small training set.

``targets``/``ignore`` choose what trains: the parameters of the selected modules; the rest is
frozen for this step. Empty (default) trains everything. Weight decay skips 1-D parameters
(biases, norm scales), the usual practice.

Data parallel: launched by ``torchrun --nproc-per-node=N`` the step joins the process group
(:mod:`nnsqueeze.distributed`), wraps the model in DDP, gives rank r every N-th batch starting at r
(each rank the same count), and unwraps afterwards; only rank 0 shows progress and logs. With DDP
the effective batch is N times the data's batch size, so the same ``steps`` see N times the data.
BatchNorm under DDP: a plain ``nn.BatchNorm`` normalizes with its rank's batch statistics and DDP
broadcasts rank 0's running statistics at every forward (torch's default; rank 0's buffers are
broadcast once more after the last step, so every rank ends identical); a BatchNorm attached to a
layer by ``qat`` uses the statistics of all ranks' batches together (SyncBatchNorm semantics).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from .. import distributed as dd
from ..data import as_batches, call_model, logits, split, to_device
from ..errors import DataError, ModelError
from ..registry import STEPS
from ..targets import select
from .base import Step, StepConfig
from .prune import apply_masks, mask_grads


class FinetuneConfig(StepConfig):
    epochs: int | None = Field(None, ge=1, description="passes over train_data (default 1 if steps is unset)")
    steps: int | None = Field(None, ge=1, description="optimizer steps (cycles the data); excludes epochs")
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    grad_clip: float | None = Field(None, gt=0.0, description="max global gradient norm")
    log_every: int = Field(50, ge=1, description="optimizer steps between log lines")
    shift: int = Field(0, ge=0, description="augmentation: roll each input sample along its last axis by a "
                       "random offset in [-shift, shift] (circular); 0 = off")

    @model_validator(mode="after")
    def _one_length(self) -> "FinetuneConfig":
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give either epochs or steps, not both")
        return self


def _finite(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return all(_finite(v) for v in obj)
    return True


@STEPS.register("finetune")
class Finetune(Step):
    Config = FinetuneConfig
    trains: ClassVar[bool] = True

    # ---- pieces ---------------------------------------------------------------------------------

    def _trainable(self, model: nn.Module, ctx: Any) -> list[nn.Parameter]:
        c = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            # An error, not a skip: the user asked for training, and a model returned untrained
            # under a recipe that says it was fine-tuned would be a silent wrong result.
            n = sum(1 for _ in model.parameters())
            raise ModelError(self.where, f"every parameter of the model is frozen (requires_grad=False on all {n}): "
                             "there is nothing to train",
                             fix="unfreeze what should train (p.requires_grad_(True)) before compress, or "
                             "remove this step")
        if not c.targets and not c.ignore:
            return params
        sel = select(model, c.targets or ["re:.*"], c.ignore, (), where=f"{self.where}.targets")
        chosen = {id(p) for _, m in sel.layers for p in m.parameters()}
        if not c.targets:  # "everything but ignore": include parameters owned by the root itself
            chosen |= {id(p) for p in model.parameters(recurse=False)}
        ignored = {id(p) for name, _ in sel.skipped for p in model.get_submodule(name).parameters()}
        for name, reason in sel.skipped:
            ctx.skip(self.registered_name, name, f"frozen ({reason})")
        out = [p for p in params if id(p) in chosen and id(p) not in ignored]
        if not out:
            raise DataError(f"{self.where}.targets", "no trainable parameter selected",
                            fix="select modules that have parameters with requires_grad=True")
        return out

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        # No decay on 1-D parameters (biases, norm scales): decaying them only hurts.
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": c.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)
        return torch.optim.AdamW(groups, lr=c.lr)

    def _scheduler(self, opt: torch.optim.Optimizer, total: int) -> Any:
        c = self.config
        if c.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total)
        if c.schedule == "cosine":  # lr * (1 + cos(pi t / T)) / 2, from lr down to 0 at the last step
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total)))
        return None

    def _loss(self, model: nn.Module, batch: Any, ctx: Any) -> torch.Tensor:
        inputs, targets = split(batch)
        out = call_model(model, inputs)
        if ctx.loss_fn is not None:
            return ctx.loss_fn(out, targets)
        if isinstance(batch, dict):
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if loss is None:
                raise DataError("train_data", "dict batch but the model output has no .loss",
                                fix="put 'labels' in the batches or pass loss_fn=...")
            return loss
        if targets is None:
            raise DataError("train_data", "batches have no targets", fix="give (inputs, targets) batches "
                            "or pass loss_fn=...")
        z = logits(out)
        if z.dim() > 2 and targets.shape == z.shape[:-1]:  # (N, T, C) sequence logits vs (N, T) labels
            z, targets = z.reshape(-1, z.shape[-1]), targets.reshape(-1)
        try:
            return F.cross_entropy(z, targets)
        except (RuntimeError, ValueError, IndexError) as e:
            raise DataError("train_data", f"cross-entropy of outputs {tuple(z.shape)} against targets "
                            f"{tuple(targets.shape)} failed: {str(e).splitlines()[0][:200]}",
                            fix="give class-index targets or pass loss_fn=...") from None

    @staticmethod
    def _cycle(data: Any, total: int) -> Iterator[Any]:
        n = 0
        while True:
            for batch in data:
                if n >= total:
                    return
                yield batch
                n += 1

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c = self.config
        data = as_batches(ctx.train_data, "train_data", required=True)
        torch.manual_seed(ctx.seed)  # the same shuffles/dropout on every rank and every run
        device = dd.init(ctx.device)
        shard = dd.Shard(data)
        total = c.steps or (c.epochs or 1) * len(shard)
        main = dd.is_main()

        params = self._trainable(model, ctx)
        keep = {id(p) for p in params}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
        was_training = model.training
        model.to(device).train()
        for p in frozen:
            p.requires_grad_(False)
        apply_masks(model)  # masks hold from the first step on, whatever happened before
        net = dd.wrap(model, device)
        opt = self._optimizer(params)
        sched = self._scheduler(opt, total)
        callbacks = list(ctx.callbacks)
        losses: list[float] = []
        t0 = time.perf_counter()
        progress = _progress(ctx.progress and main)
        gen = torch.Generator().manual_seed(ctx.seed + 7919 * dd.rank()) if c.shift else None
        try:
            with progress:
                task = progress.add_task("finetune", total=total) if progress is not _NULL else None
                for cb in callbacks:
                    cb.on_train_begin(model, total)
                for step, batch in enumerate(self._cycle(shard, total)):
                    batch = to_device(batch, device)
                    if gen is not None:
                        batch = shift_batch(batch, c.shift, gen)
                    loss = self._loss(net, batch, ctx)
                    for cb in callbacks:  # extra loss terms (e.g. a QAT grid regularizer)
                        if hasattr(cb, "penalty"):
                            loss = loss + cb.penalty(model)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        where = f"{self.where} (optimizer step {step})"
                        if not _finite(batch):
                            raise DataError(where, f"loss is {value}: the batch contains NaN/inf",
                                            fix="clean or normalise the training data")
                        raise ModelError(where, f"loss is {value}", fix="lower lr or set grad_clip")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    mask_grads(model)
                    if c.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                    opt.step()
                    apply_masks(model)
                    if sched is not None:
                        sched.step()
                    for cb in callbacks:
                        cb.on_step_end(model, step, total)
                    losses.append(value)
                    if task is not None:
                        progress.update(task, advance=1, description=f"finetune loss {value:.4f}")
                    if main and ((step + 1) % c.log_every == 0 or step + 1 == total):
                        ctx.log.info("finetune: step %d/%d loss %.4f lr %.3g", step + 1, total, value,
                                     opt.param_groups[0]["lr"])
                # DDP broadcasts rank 0's buffers at each forward; the last forward's own updates
                # (running statistics of plain BatchNorms) would leave the ranks differing.
                dd.broadcast_buffers(model)
                for cb in callbacks:
                    cb.on_train_end(model)
        finally:
            model = dd.unwrap(net)
            model.train(was_training)
            for p in frozen:
                p.requires_grad_(True)
        tail = losses[-min(len(losses), c.log_every):]
        final = dd.mean(sum(tail) / max(1, len(tail)), device)
        ctx.report.step(steps=total, final_loss=round(final, 6), first_loss=round(dd.mean(losses[0], device), 6),
                        seconds=round(time.perf_counter() - t0, 3), world_size=dd.world_size(),
                        trainable_params=sum(p.numel() for p in params))
        return model


def shift_batch(batch: Any, max_shift: int, gen: torch.Generator) -> Any:
    """``(x, y)`` (or a bare ``x``) with every sample of ``x`` (N, ..., L) rolled by its own offset in
    ``[-max_shift, max_shift]``; other batch kinds (dicts) raise DataError."""
    if not max_shift:
        return batch
    if isinstance(batch, torch.Tensor):  # inputs only (e.g. an unlabeled distillation batch)
        return shift_batch((batch,), max_shift, gen)[0]
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise DataError("train_data", f"shift augmentation needs floating (N, ..., L) tensor inputs, got "
                        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}",
                        fix="set shift: 0 for this data")
    n, length = x.shape[0], x.shape[-1]
    off = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=gen).to(x.device)
    idx = (torch.arange(length, device=x.device).unsqueeze(0) - off) % length          # (N, L)
    idx = idx.reshape(n, *([1] * (x.dim() - 2)), length).expand_as(x)
    return (x.gather(-1, idx), *batch[1:])


class _Null(contextlib.nullcontext):
    def add_task(self, *a: Any, **k: Any) -> None:  # pragma: no cover - never called
        return None


_NULL = _Null()


def _progress(show: bool) -> Any:
    if not show:
        return _NULL
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True)
