"""Greedy batch-1 generation with the whole token step in C (:mod:`nnsqueeze.llm.decode_c`).

:func:`generate` takes a transformers ``LlamaForCausalLM`` whose Linears are ``nn.Linear`` (float32) or
:class:`~nnsqueeze.llm.packed.PackedLinear` (int4 / int8 codes, read as stored), runs the prompt through
the torch model (``prefill="torch"``, default: one batched forward, its KV cache copied into the C cache)
or token by token in C (``prefill="c"``), then calls ``nsq_step`` once per new token: all layers,
``lm_head`` and the argmax, with ``torch.get_num_threads()`` OpenMP threads. The result is what
``model.generate(input_ids, do_sample=False, ...)`` returns: the prompt followed by the new tokens,
stopping after an end-of-sequence token.

Anything the C loop does not implement falls back to Hugging Face's ``generate`` with a logged warning
naming the reason (never silently): another architecture, rope scaling, a Linear of another class, a
batch > 1, sampling or beam search or logits processors, no C compiler. :class:`Decoder` is the
step-level interface (tests compare its logits with the torch model's, step by step)::

    >>> import torch, transformers
    >>> from nnsqueeze.llm import fastdecode
    >>> cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    ...                                num_attention_heads=6, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.tensor([[1, 5, 9, 2]])
    >>> out = fastdecode.generate(model, ids, max_new_tokens=5)
    >>> out.shape[1] <= 9 and out[:, :4].equal(ids)
    True
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from ..errors import ModelError
from . import decode_c
from .packed import PackedLinear

log = logging.getLogger("nnsqueeze")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# generate() keyword arguments the C loop honours; any other one (sampling, beams, penalties) falls back
_GREEDY = {"do_sample": False, "num_beams": 1, "temperature": None, "top_k": None, "top_p": None}
_PASSIVE = ("pad_token_id", "attention_mask", "use_cache", "return_dict_in_generate")
# generation_config fields that change greedy decoding when set (then the HF path runs)
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "min_length": 0, "renormalize_logits": False}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def unsupported(model) -> str | None:
    """Why the C loop cannot run ``model`` (a sentence), or None when it can."""
    if type(model).__name__ != "LlamaForCausalLM" or getattr(model.config, "model_type", None) != "llama":
        return f"{type(model).__name__} is not a transformers LlamaForCausalLM"
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None)
    if rope.get("rope_type", "default") != "default" or (scaling and scaling.get("rope_type", "default") != "default"):
        return f"rope scaling {scaling or rope} is not implemented (default RoPE only)"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) > 1:
        return f"hidden_act={cfg.hidden_act!r}, pretraining_tp={getattr(cfg, 'pretraining_tp', 1)} (silu, 1 only)"
    inner = model.model
    rot = getattr(inner, "rotary_emb", None)
    if rot is None or getattr(rot, "rope_type", "default") != "default":
        return "the model has no default rotary embedding module (model.model.rotary_emb)"
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        return f"{cfg.num_attention_heads} heads do not divide into {cfg.num_key_value_heads} key/value heads"
    mods = [("lm_head", model.lm_head)] + [(f"model.layers.{i}.{p}.{n}", getattr(getattr(ly, p), n))
                                            for i, ly in enumerate(inner.layers)
                                            for p, n in [("self_attn", x) for x in LINEARS[:4]]
                                            + [("mlp", x) for x in LINEARS[4:]]]
    for name, mod in mods:
        if isinstance(mod, PackedLinear):
            if mod.bits not in (4, 8) or mod.weight_scale_.dtype != torch.float32:
                return f"{name}: packed int{mod.bits} with {mod.weight_scale_.dtype} scales (int4/int8, float32 only)"
        elif type(mod) is not nn.Linear:
            return f"{name} is a {type(mod).__name__} (the C loop reads nn.Linear and PackedLinear)"
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32):
            return f"{name} is {t.dtype} on {t.device} (float32 on CPU only)"
    return None


class Decoder:
    """The C step of one model with a KV cache of ``max_len`` positions (see the module docstring).

    ``step(token, pos)`` returns the argmax token; ``logits`` (vocab,) holds that step's logits.
    Raises :class:`~nnsqueeze.errors.ModelError` when :func:`unsupported` names a reason or no library.
    """

    def __init__(self, model, max_len: int, act8: bool = False):
        why = unsupported(model)
        lib, lib_why = decode_c.load()
        if why or lib is None:
            raise ModelError("fastdecode.Decoder", why or lib_why,
                             fix="use model.generate, or fastdecode.generate, which falls back to it")
        self.lib, self.model, self._keep = lib, model, []
        cfg, inner = model.config, model.model
        h, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        self.kc = torch.zeros(cfg.num_hidden_layers, kvh, max_len, d)
        self.vc = torch.zeros_like(self.kc)
        layers = (decode_c.Layer * cfg.num_hidden_layers)()
        for i, ly in enumerate(inner.layers):
            for j, n in enumerate(LINEARS):
                setattr(layers[i], n[:-5], self._lin(getattr(ly.self_attn if j < 4 else ly.mlp, n)))
            layers[i].ln1 = self._f32(ly.input_layernorm.weight)
            layers[i].ln2 = self._f32(ly.post_attention_layernorm.weight)
            layers[i].kc, layers[i].vc = _ptr(self.kc[i]), _ptr(self.vc[i])
        emb, first = inner.embed_tokens, inner.layers[0] if len(inner.layers) else None
        self.embed = emb if type(emb) is not nn.Embedding else None      # else C reads the row itself
        m = decode_c.Model(
            L=cfg.num_hidden_layers, H=h, KVH=kvh, D=d, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
            vocab=model.lm_head.out_features, T=max_len, act8=int(act8),
            eps=first.input_layernorm.variance_epsilon if first is not None else cfg.rms_norm_eps,
            scaling=getattr(first.self_attn, "scaling", d ** -0.5) if first is not None else d ** -0.5,
            rope_scale=float(getattr(inner.rotary_emb, "attention_scaling", 1.0)),
            inv_freq=self._f32(inner.rotary_emb.inv_freq), norm=self._f32(inner.norm.weight),
            embed=None if self.embed is not None else self._f32(emb.weight), head=self._lin(model.lm_head))
        m.layers = ctypes.cast(layers, ctypes.POINTER(decode_c.Layer))
        self._layers = layers                                         # the structs must outlive the calls
        self.work = torch.empty(lib.nsq_work_floats(ctypes.byref(m)))
        m.work = _ptr(self.work)
        self.m, self.max_len = m, max_len
        self.logits = torch.empty(m.vocab)
        self._x = torch.empty(cfg.hidden_size)

    def _f32(self, t: torch.Tensor) -> int:
        t = t.detach().to(torch.float32).contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _lin(self, mod) -> decode_c.Lin:
        bias = None if mod.bias is None else self._f32(mod.bias)
        if isinstance(mod, PackedLinear):
            w, s = mod.weight.contiguous(), mod.weight_scale_.contiguous()
            z = mod.weight_zero_point_.to(torch.uint8).contiguous()
            self._keep += [w, s, z]
            si = mod._buffers.get("input_scale_")
            return decode_c.Lin(kind=mod.bits, N=mod.out_features, K=mod.in_features, G=s.shape[1],
                                g=mod._gsize(), W=_ptr(w), S=_ptr(s), Z=_ptr(z), bias=bias,
                                in_scale=None if si is None else self._f32(si))
        return decode_c.Lin(kind=0, N=mod.out_features, K=mod.in_features, G=0, g=0, W=self._f32(mod.weight),
                            bias=bias)

    def load_cache(self, cache, n: int) -> bool:
        """Copy the first ``n`` positions of a transformers cache (batch 1); False if its layout is unknown."""
        try:
            layers = getattr(cache, "layers", None)
            for i in range(self.kc.shape[0]):
                k, v = (layers[i].keys, layers[i].values) if layers is not None else (cache.key_cache[i],
                                                                                      cache.value_cache[i])
                self.kc[i, :, :n] = k[0, :, :n]
                self.vc[i, :, :n] = v[0, :, :n]
        except (AttributeError, IndexError, TypeError, RuntimeError):
            return False
        return True

    def step(self, token: int, pos: int) -> int:
        if not 0 <= pos < self.max_len:
            raise ModelError("Decoder.step", f"position {pos} is outside the cache of {self.max_len}",
                             fix="build the Decoder with a larger max_len")
        x = None
        if self.embed is not None:
            with torch.no_grad():
                self._x.copy_(self.embed(torch.tensor([token])).reshape(-1))
            x = _ptr(self._x)
        r = self.lib.nsq_step(ctypes.byref(self.m), int(token), x, pos, _ptr(self.logits), torch.get_num_threads())
        if r < 0:
            raise (MemoryError("nsq_step: out of memory") if r == -1 else
                   ModelError("Decoder.step", f"token {token} is outside the vocabulary of {self.m.vocab}",
                              fix="pass token ids of this model's tokenizer"))
        return r


def _fallback_reason(model, input_ids, kwargs: dict) -> str | None:
    for k, v in kwargs.items():
        if k in _GREEDY:
            if v is not None and v != _GREEDY[k] and not (k == "temperature" and v == 1.0):
                return f"{k}={v!r} (greedy decoding only)"
        elif k == "attention_mask":
            if v is not None and not bool(v.all()):
                return "an attention_mask with padding"
        elif k not in _PASSIVE:
            return f"generate argument {k!r} is not implemented by the C loop"
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        return f"input_ids of shape {tuple(input_ids.shape)} (batch 1 only)"
    gc = getattr(model, "generation_config", None)
    for k, default in _PROCESSORS.items():
        v = getattr(gc, k, default) if gc is not None else default
        if v not in (default, None) and not (isinstance(v, (list, tuple)) and not v):
            return f"generation_config.{k}={v!r} changes greedy decoding"
    why = unsupported(model)
    if why is None:
        why = decode_c.load()[1] or None
    return why


def _eos(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, min_new_tokens: int = 0,
             prefill: str = "torch", act8: bool = False, **kwargs) -> torch.Tensor:
    """Greedy decoding, batch 1: ``model.generate(input_ids, max_new_tokens=..., do_sample=False)``'s
    result, computed by the C loop (see the module docstring; other cases fall back, logged)."""
    if prefill not in ("torch", "c"):
        raise ModelError("fastdecode.generate", f"prefill={prefill!r}", fix="use prefill='torch' or 'c'")
    why = _fallback_reason(model, input_ids, kwargs)
    if why:
        log.warning("fastdecode: %s; falling back to Hugging Face generate", why)
        if not hasattr(model, "generate"):
            raise ModelError("fastdecode.generate", f"{why}, and {type(model).__name__} has no generate()",
                             fix="pass a transformers causal LM")
        kw = {**kwargs, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
        kw.setdefault("do_sample", False)
        if eos_token_id is not None:
            kw["eos_token_id"] = eos_token_id
        return model.generate(input_ids, **kw)
    ids = input_ids[0].tolist()
    n = len(ids)
    if max_new_tokens <= 0:
        return input_ids.clone()
    dec = Decoder(model, n + max_new_tokens, act8=act8)
    eos = _eos(model, eos_token_id)

    def pick(logits: torch.Tensor, made: int, tok: int) -> int:
        if made < min_new_tokens and eos and tok in eos:     # as MinNewTokensLengthLogitsProcessor: eos -inf
            logits = logits.clone()
            logits[list(eos)] = float("-inf")
            return int(logits.argmax())
        return tok

    if prefill == "torch":
        out = model(input_ids, use_cache=True)
        last = out.logits[0, -1]
        cache = out["cache"] if "cache" in out else out.past_key_values    # transformers >= 5.2 names it cache
        if dec.load_cache(cache, n):
            tok = pick(last, 0, int(last.argmax()))
        else:
            log.warning("fastdecode: unknown transformers cache layout; prefilling token by token in C")
            prefill = "c"
    if prefill == "c":
        for pos, t in enumerate(ids):
            tok = dec.step(t, pos)
        tok = pick(dec.logits, 0, tok)
    new = [tok]
    while len(new) < max_new_tokens and tok not in eos:
        tok = pick(dec.logits, len(new), dec.step(tok, n + len(new) - 1))
        new.append(tok)
    return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)
