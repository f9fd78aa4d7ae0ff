"""Step ``rotate``: QuaRot/SpinQuant-style orthogonal rotation of a LLaMA-architecture model, folded
into the weights, so that the 4-bit steps after it (``rtn``, ``gptq``, ``awq``) see weights (and
activations) without outlier channels. A float-to-float transform: the logits do not change beyond
rounding (checked on a random batch before the step returns).

1. Every RMSNorm's weight is folded into the Linears that read it (q/k/v, gate/up, ``lm_head``)
   and set to 1: a weightless RMSNorm commutes with any orthogonal ``Q`` (``||x Q|| = ||x||``).
2. The residual stream is rotated by ``Q`` (``rotation: hadamard``: a Hadamard matrix with random
   row signs from ``seed``; ``random``: a random orthogonal matrix from ``seed``): embeddings
   ``E -> E Q``; Linears reading the residual ``W -> W Q``; Linears writing to it (``o_proj``,
   ``down_proj``) ``W -> Q^T W`` (and ``b -> b Q``).
3. ``online_hadamard: true``: ``down_proj``'s input is rotated at run time by a fast
   Walsh-Hadamard transform ``R`` (a forward pre-hook) and ``W -> W R``; its size is the MLP width
   (``online_block: hadamard`` needs a size of :func:`nnsqueeze.ops.hadamard.hadamard`, ``random``
   works for any size: a seeded random orthogonal block for the odd part).
4. ``per_head: true``: ``v_proj``'s outputs and ``o_proj``'s inputs are rotated per head by a
   Hadamard of the head size (no run-time cost).

Tied embeddings (``lm_head.weight is embed_tokens.weight``): kept tied when the final norm's weight
is all ones (the math then allows it), otherwise ``lm_head`` gets its own copy ("untied" in the log
and the record; ``nsq.load`` unties the fresh model the same way). The rotated weights are saved,
so loading needs no matrix; the record holds the seed, the sizes and the hooked layers::

    steps:
      - rotate: {rotation: hadamard, seed: 0, online_hadamard: true}
      - gptq: {bits: 4, group_size: 128, act_order: true, clip: {method: mse}}

Pair it with a data-aware quantizer (``gptq``), not ``rtn``, on models with massive activations.
SmolLM2-135M's residual stream has one channel at up to 23,700 (median ``|h|`` about 2) that the
RMSNorm weights suppress (down to 1e-4). Unrotated, that channel's weight column is scaled by the
norm weight, or after folding is so small that RTN rounds it to zero with an error no larger than
itself. Rotated, the channel is spread over every input and RTN's error along it is a full
quantization step, multiplied by the channel's energy: the reading layers' output error on such
tokens grows 2-11x, and perplexity with it (tests/steps/test_rotate_rtn.py reproduces it on a
tiny LLaMA; numbers in BENCHMARKS.md). GPTQ sees the channel in its Hessian and compensates.

Supported: decoder blocks with ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj`` (LLaMA, Mistral, Qwen2, SmolLM, the
embedded TinyLlama), an RMSNorm without bias, ``embed_tokens`` and ``norm`` next to the blocks and
an ``lm_head``. Anything else is a ModelError naming the missing part.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ModelError, RecipeError
from ..llm.sequential import find_blocks
from ..ops.hadamard import KronRotation, hadamard, random_hadamard, random_orthogonal
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


class RotateConfig(StepConfig):
    rotation: Literal["hadamard", "random"] = Field("hadamard", description="residual rotation: randomized "
                                                    "Hadamard (hidden size of hadamard()) or random orthogonal")
    seed: int = Field(0, ge=0, description="random signs / random orthogonal matrices come from this seed")
    online_hadamard: bool = Field(False, description="rotate down_proj's input at run time (fast Hadamard)")
    online_block: Literal["hadamard", "random"] = Field("hadamard", description="online rotation's non-power-"
                                                        "of-two block: Paley Hadamard or seeded random orthogonal")
    per_head: bool = Field(False, description="rotate v_proj outputs / o_proj inputs per head (head size)")


class InputRotation:
    """Forward pre-hook ``x -> x R`` on a Linear's input (``R`` a :class:`KronRotation`)."""

    def __init__(self, rot: KronRotation):
        self.rot = rot

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.rot.apply(args[0]),) + tuple(args[1:])


def add_input_rotation(mod: nn.Module, rot: KronRotation) -> None:
    """Hook ``rot`` onto ``mod``'s input (once); ``mod.input_rotation`` tells it is there."""
    if getattr(mod, "input_rotation", None) is None:
        mod.register_forward_pre_hook(InputRotation(rot))
        mod.input_rotation = rot


def _sub(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"{where}: {name}", "not found: rotate supports LLaMA-architecture models "
                         "(embed_tokens, input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, "
                         "mlp.{gate,up,down}_proj, norm, lm_head)",
                         fix="use a LLaMA-like model or drop rotate") from None


def _check_norm(norm: nn.Module, name: str, where: str) -> None:
    """The norm must compute ``w * x / rms(x)``: then folding ``w`` out and rotating is exact."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise ModelError(f"{where}: {name}", f"{type(norm).__name__} is not an RMSNorm with a weight and no bias",
                         fix="rotate needs RMSNorm (a LayerNorm's mean subtraction does not commute with Q)")
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        y = norm(x)
    ref = x / x.float().pow(2).mean(-1, keepdim=True).add(1e-5).sqrt().to(x.dtype) * w
    if not torch.allclose(y, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max().clamp(min=1))):
        raise ModelError(f"{where}: {name}", f"{type(norm).__name__} does not compute weight * x / rms(x)",
                         fix="rotate supports plain RMSNorm (not e.g. Gemma's (1 + weight) form)")


@torch.no_grad()
def _set(lin: nn.Linear, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    lin.weight.copy_(w.to(lin.weight.dtype))
    if b is not None and lin.bias is not None:
        lin.bias.copy_(b.to(lin.bias.dtype))


def _w(lin: nn.Module) -> torch.Tensor:
    if type(lin) is not nn.Linear:
        raise ModelError(type(lin).__name__, "rotate folds into plain nn.Linear layers",
                         fix="run rotate before any quantizing step, on a float model")
    return lin.weight.detach().double()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    out = model(ids)
    out = getattr(out, "logits", out)
    return out.detach().double() if isinstance(out, torch.Tensor) else None


def _untie(model: nn.Module, head: nn.Linear) -> None:
    head.weight = nn.Parameter(head.weight.detach().clone())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
        cfg.tie_word_embeddings = False  # transformers would re-tie on tie_weights() otherwise


@STEPS.register("rotate")
class Rotate(Step):
    needs_float = True
    Config = RotateConfig

    def _parts(self, model: nn.Module) -> tuple[str, nn.ModuleList, nn.Embedding, nn.Module, nn.Linear]:
        if self.config.targets or self.config.ignore:
            raise RecipeError(f"{self.where}", "rotate transforms the whole residual stream; targets/ignore "
                              "do not apply", fix="remove targets/ignore from rotate")
        prefix, blocks = find_blocks(model)
        base = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        dot = f"{base}." if base else ""
        embed = _sub(model, f"{dot}embed_tokens", self.where)
        norm = _sub(model, f"{dot}norm", self.where)
        head = _sub(model, "lm_head", self.where)
        if not isinstance(embed, nn.Embedding):
            raise ModelError(f"{self.where}: {dot}embed_tokens", f"expected nn.Embedding, found {type(embed).__name__}")
        return prefix, blocks, embed, norm, head

    @torch.no_grad()
    def run(self, model, ctx):
        c = self.config
        prefix, blocks, embed, norm, head = self._parts(model)
        d = embed.weight.shape[1]
        try:
            q = random_hadamard(d, c.seed) if c.rotation == "hadamard" else random_orthogonal(d, c.seed)
        except ValueError as e:
            raise RecipeError(f"{self.where}.rotation", f"hidden size {d}: {e}",
                              fix="use rotation: random (a seeded random orthogonal matrix works for any size)"
                              ) from None
        mlp_width = _w(_sub(model, f"{prefix}.0.mlp.down_proj", self.where)).shape[1]
        online = None
        if c.online_hadamard:
            try:
                online = KronRotation(mlp_width, c.online_block, c.seed)
            except ValueError as e:
                raise RecipeError(f"{self.where}.online_block", f"MLP width {mlp_width}: {e}",
                                  fix="use online_block: random, or online_hadamard: false") from None
        head_dim = self._head_dim(model, blocks) if c.per_head else None
        for i, blk in enumerate(blocks):  # validate everything before changing anything
            for n in ("input_layernorm", "post_attention_layernorm"):
                _check_norm(_sub(blk, n, f"{self.where}: {prefix}.{i}"), f"{prefix}.{i}.{n}", self.where)
            for n in READERS + MLP_READERS + WRITERS:
                _w(_sub(blk, n, f"{self.where}: {prefix}.{i}"))
        _check_norm(norm, "norm", self.where)
        _w(head)

        ids = torch.randint(0, embed.weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(c.seed))
        ids = ids.to(embed.weight.device)
        before = _logits(model, ids)

        dev = embed.weight.device
        q = q.to(dev)
        tied = head.weight is embed.weight
        untie = tied and not bool((norm.weight == 1).all())
        if untie:
            _untie(model, head)
            ctx.log.info("rotate: lm_head was tied to embed_tokens; untied (the final norm's weight folds "
                         "into lm_head only)")
        for blk in blocks:
            self._fold(blk, "input_layernorm", READERS, q)
            self._fold(blk, "post_attention_layernorm", MLP_READERS, q)
            for n in WRITERS:
                lin = blk.get_submodule(n)
                b = None if lin.bias is None else lin.bias.detach().double() @ q
                _set(lin, q.T @ _w(lin), b)
            if online is not None:
                down = blk.get_submodule("mlp.down_proj")
                _set(down, _w(down) @ online.matrix().to(dev))
                add_input_rotation(down, online)
            if head_dim is not None:
                self._rotate_heads(blk, head_dim, dev)
        embed.weight.copy_((embed.weight.detach().double() @ q).to(embed.weight.dtype))
        if not tied or untie:
            hw = _w(head) * norm.weight.detach().double().unsqueeze(0)
            _set(head, hw @ q)
        norm.weight.fill_(1.0)

        after = _logits(model, ids)
        change = 0.0 if before is None else float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
        tol = 1e-3 if embed.weight.dtype in (torch.float32, torch.float64) else 5e-2
        if change > tol:
            raise ModelError(f"{self.where}", f"the rotated model's logits differ by {change:.3g} (relative) "
                             "from the original's: this architecture is not a plain LLaMA",
                             fix="drop rotate for this model")
        self.record_ = {"rotation": c.rotation, "seed": c.seed, "hidden_size": d, "untied": untie,
                        "online": [f"{prefix}.{i}.mlp.down_proj" for i in range(len(blocks))] if online else [],
                        "online_size": mlp_width if online else None, "online_block": c.online_block,
                        "per_head": head_dim, "max_relative_logit_change": change}
        try:
            ctx.report.step(rotation=c.rotation, online_hadamard=bool(online), per_head=bool(head_dim),
                            untied_lm_head=untie, max_relative_logit_change=change)
        except RuntimeError:  # outside a recipe run
            pass
        ctx.log.info("rotate: %s rotation of %d blocks (hidden %d)%s; logits change %.2g (relative)", c.rotation,
                     len(blocks), d, f", online Hadamard {mlp_width} on down_proj" if online else "", change)
        return model

    @staticmethod
    def _fold(blk: nn.Module, norm_name: str, readers: tuple[str, ...], q: torch.Tensor) -> None:
        norm = blk.get_submodule(norm_name)
        w = norm.weight.detach().double()
        for n in readers:
            lin = blk.get_submodule(n)
            _set(lin, (_w(lin) * w.unsqueeze(0)) @ q)
        with torch.no_grad():
            norm.weight.fill_(1.0)

    def _head_dim(self, model: nn.Module, blocks: nn.ModuleList) -> int:
        attn = blocks[0].get_submodule("self_attn")
        hd = getattr(attn, "head_dim", None)
        if hd is None:
            cfg = getattr(model, "config", None)
            hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads if cfg else None)
        if not isinstance(hd, int):
            raise ModelError(f"{self.where}.per_head", "cannot find the attention head size (self_attn.head_dim)",
                             fix="set per_head: false")
        try:
            hadamard(hd)
        except ValueError as e:
            raise RecipeError(f"{self.where}.per_head", f"head size {hd}: {e}", fix="set per_head: false") from None
        return hd

    @staticmethod
    def _rotate_heads(blk: nn.Module, hd: int, dev: torch.device) -> None:
        """``v -> v H`` per head (rows of v_proj), ``o_proj`` input columns per head ``-> W (I ⊗ H)``."""
        h = hadamard(hd).to(dev)
        v, o = blk.get_submodule("self_attn.v_proj"), blk.get_submodule("self_attn.o_proj")
        wv = _w(v)
        wv = torch.einsum("kdi,de->kei", wv.view(-1, hd, wv.shape[1]), h).reshape(wv.shape)
        bv = None if v.bias is None else (v.bias.detach().double().view(-1, hd) @ h).reshape(-1)
        _set(v, wv, bv)
        wo = _w(o)
        _set(o, (wo.view(wo.shape[0], -1, hd) @ h).reshape(wo.shape))

    def record(self) -> dict[str, Any]:
        return self.record_

    @classmethod
    def rebuild(cls, model, config, record):
        """Untie ``lm_head`` if the run did and re-hook the online rotations; weights come from the file."""
        if record.get("untied"):
            prefix, _ = find_blocks(model)
            base = prefix.rsplit(".", 1)[0] if "." in prefix else ""
            embed = recorded_module(model, f"{base}.embed_tokens" if base else "embed_tokens", (nn.Embedding,),
                                    "rotate record")
            head = recorded_module(model, "lm_head", (nn.Module,), "rotate record")
            if head.weight is embed.weight:
                _untie(model, head)
        if record.get("online"):
            rot = KronRotation(int(record["online_size"]), record.get("online_block", "hadamard"),
                               int(record.get("seed", 0)))
            for name in record["online"]:
                add_input_rotation(recorded_module(model, name, (nn.Module,), "rotate record"), rot)
        return model
