"""Tiny random LLaMA models for the Hugging Face / GGUF input tests, built locally (no network):
a byte-level BPE tokenizer trained on a few sentences, a 2-block LLaMA, written as a Hugging Face
directory (:func:`write_hf_dir`) or as a GGUF file the way llama.cpp's converter writes one
(:func:`write_gguf`: F32 tensors, llama metadata, gpt2-style tokenizer, q/k rows permuted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model is quantized to four bits and measured again.",
    "Perplexity is the exponential of the mean negative log likelihood.",
    "def add(a, b):\n    return a + b\n",
    "Calibration windows come from the training text, evaluation windows are held out.",
]
EOS = "<|endoftext|>"


def tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False)


def model(vocab_size: int, seed: int = 0, tie: bool = False):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # random norms too, so a missing or misplaced norm weight shows
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
    return m


def write_hf_dir(path: Path, seed: int = 0):
    """A tiny LLaMA + tokenizer saved to ``path``; returns ``(model, tokenizer)``."""
    tok = tokenizer()
    m = model(len(tok), seed)
    m.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return m, tok


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, seed: int = 0, tie: bool = False):
    """The tiny LLaMA + tokenizer as one GGUF file; returns ``(model, tokenizer)`` (the source)."""
    import gguf

    tok = tokenizer()
    m = model(len(tok), seed, tie=tie)
    c = m.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)  # all F32
    vocab = sorted(tok.backend_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == EOS else 1 for t, _ in vocab])  # 3: control, 1: normal
    import json

    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(x) if isinstance(x, list) else x for x in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return m, tok
