"""GGUF files (llama.cpp) from a LLaMA-architecture causal LM packed by nnsqueeze.

Quantized Linears become ``Q4_0`` (int4) or ``Q8_0`` (int8): blocks of 32 inputs with one float16
scale ``d`` and symmetric codes, value ``(q - 8) * d`` (Q4_0, ``q`` in [0, 15], byte ``j`` of a
block holds input ``j`` in its low nibble and input ``j + 16`` in its high one) or ``q * d`` (Q8_0,
``q`` int8). nnsqueeze's symmetric group-32 codes map onto them unchanged (Q4_0's ``q`` is the
int4 code, Q8_0's is the int8 code minus 128), so the export is exact when the scales are float16
values: quantize with ``rtn``/``gptq`` ``{bits: 4 or 8, group_size: 32, symmetric: true,
scale_dtype: fp16}``. Any other scheme is an ExportError naming that recipe.

The rest (embeddings, norms, ``lm_head`` unless quantized) is F32, or F16 for 2-D tensors with
``float_type="f16"``; norms always stay F32 (as llama.cpp's converter writes them). Tensor names
follow llama.cpp (``token_embd``, ``blk.N.attn_q``, ``ffn_gate``, ``output_norm``, ``output``...),
and ``attn_q`` / ``attn_k`` rows are permuted as llama.cpp's converter does for LLaMA (its rotary
embedding pairs adjacent dimensions, Hugging Face's pairs the two halves of a head): rows only, so
codes and scales move with their rows and stay exact. Metadata: the ``llama.*`` hyper-parameters,
and with a tokenizer (a BPE ``tokenizers`` backend) the ``tokenizer.ggml.*`` vocabulary, merges,
token types and special ids. Needs the ``gguf`` package (``pip install "nnsqueeze[formats]"``).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..registry import EXPORTERS
from .hf_formats import Scheme, exact_scales, float_tensors, hf_config, packed_layers, scheme_of

FMT = "gguf"
BLOCK = 32
FILE = "model.gguf"
_BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face LLaMA tensor (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``); an unknown tensor is an ExportError (not a LLaMA model)."""
    mod, _, kind = hf_name.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", mod)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"blk.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{kind}"
    if mod in _TOP_NAMES:
        return f"{_TOP_NAMES[mod]}.{kind}"
    raise ExportError(hf_name, "has no place in a llama GGUF file", fix="export a LlamaForCausalLM model")


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives ``q_proj`` / ``k_proj``: new row ``i`` = old row ``idx[i]``."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def quant_type(name: str, s: Scheme, k: int) -> str:
    """``"Q4_0"`` or ``"Q8_0"`` for a scheme GGUF holds exactly, else an ExportError with the nearest fit."""
    fit = Scheme(4 if s.bits <= 4 else 8, BLOCK, True).recipe(scale_dtype="fp16")
    if s.bits not in (4, 8) or not s.symmetric or s.group_size != BLOCK:
        raise ExportError(name, f"GGUF's Q4_0/Q8_0 are symmetric with groups of {BLOCK} and this layer is {s}",
                          fix=f"quantize with `{fit}`")
    if k % BLOCK:
        raise ExportError(name, f"in_features {k} is not a multiple of {BLOCK} (GGUF blocks)",
                          fix="keep this layer in float (ignore it)")
    return "Q4_0" if s.bits == 4 else "Q8_0"


def blocks(codes: torch.Tensor, scale16: torch.Tensor, qtype: str) -> np.ndarray:
    """(N, K) codes and (N, K / 32) float16 scales -> uint8 (N, K / 32 * block bytes) GGUF blocks."""
    n, k = codes.shape
    q = codes.reshape(n, k // BLOCK, BLOCK)
    if qtype == "Q4_0":
        q = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
    else:
        q = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
    d = scale16.contiguous().view(torch.uint8).reshape(n, k // BLOCK, 2)   # little-endian float16
    return torch.cat([d, q], -1).reshape(n, -1).numpy()


def _cfg(cfg: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        v = getattr(cfg, k, None)
        if v is not None:
            return v
    rope = getattr(cfg, "rope_parameters", None) or {}
    return rope.get(keys[0], default) if isinstance(rope, dict) else default


def _metadata(w: Any, cfg: Any, qtypes: set[str]) -> None:
    import gguf

    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    w.add_name(getattr(cfg, "_name_or_path", "") or "nnsqueeze-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or hidden // heads)
    w.add_rope_freq_base(float(_cfg(cfg, "rope_theta", default=10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    ftype = gguf.LlamaFileType.MOSTLY_Q4_0 if "Q4_0" in qtypes else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(ftype)


def _tokenizer(w: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ExportError("tokenizer", f"GGUF export writes BPE tokenizers; this one is {model.get('type', 'slow')}",
                          fix="pass a fast BPE tokenizer, or tokenizer=None (no vocabulary in the file)")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(getattr(tokenizer, "all_special_ids", []))
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        v = getattr(tokenizer, key, None)
        if v is not None:
            add(int(v))


@EXPORTERS.register(FMT)
def export_gguf(model: nn.Module, tokenizer: Any = None, config: Any = None,
                float_type: str = "f32") -> tuple[dict[str, bytes | str], dict]:
    """``(files, info)``: one ``model.gguf``; see the module docstring."""
    try:
        import gguf
    except ImportError:
        raise ExportError(FMT, "the gguf package is not installed",
                          fix='pip install "nnsqueeze[formats]" (or pip install gguf)') from None
    if float_type not in ("f32", "f16"):
        raise ExportError(f"{FMT}.float_type", f"unknown float_type {float_type!r}", fix="use f32 or f16")
    cfg = hf_config(model, config, FMT)
    if getattr(cfg, "model_type", None) != "llama":
        raise ExportError(FMT, f"GGUF export supports the LLaMA architecture, not {getattr(cfg, 'model_type', '?')!r}",
                          fix="use format compressed-tensors or gptq for this model")
    layers = packed_layers(model, FMT)
    heads = {"attn_q": cfg.num_attention_heads,
             "attn_k": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads}
    out: list[tuple[str, np.ndarray, Any]] = []   # checked and converted first: nothing written on error
    qtypes, info = set(), {}
    for name, m in layers.items():
        s = scheme_of(m)
        qtype = quant_type(name, s, m.in_features)
        scale = exact_scales(name, m, torch.float16, FMT, Scheme(s.bits, BLOCK, True).recipe(scale_dtype="fp16"))
        codes, gname = m.weight_codes(), gguf_name(f"{name}.weight")
        role = gname.split(".")[2]
        if role in heads:
            idx = rope_rows(m.out_features, heads[role])
            codes, scale = codes[idx], scale[idx]
        out.append((gname, blocks(codes, scale, qtype), getattr(gguf.GGMLQuantizationType, qtype)))
        if m.bias is not None:
            raise ExportError(name, "has a bias, which llama GGUF files do not hold", fix="export a LLaMA model")
        qtypes.add(qtype)
        info[name] = qtype
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, t in float_tensors(model, layers).items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        gname = gguf_name(key)
        role = gname.split(".")[2] if gname.startswith("blk.") else ""
        if role in heads:
            t = t[rope_rows(t.shape[0], heads[role])]
        dt = torch.float16 if float_type == "f16" and t.dim() == 2 else torch.float32
        out.append((gname, t.to(dt).contiguous().numpy(), None))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / FILE
        w = gguf.GGUFWriter(path, "llama")
        _metadata(w, cfg, qtypes)
        if tokenizer is not None:
            _tokenizer(w, tokenizer, cfg.vocab_size)
        for gname, arr, raw in out:
            w.add_tensor(gname, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = path.read_bytes()
    return {FILE: data}, {"float_type": float_type, "layers": info}
