"""Post-training compression of causal language models, block by block.

Pure math, one technique per file: :mod:`.rtn`, :mod:`.gptq`, :mod:`.awq`, :mod:`.smoothquant`,
:mod:`.sparsegpt`, :mod:`.wanda`. :mod:`.sequential` walks the decoder blocks of a model and applies
one of them to every targeted Linear; :mod:`.tiny` is a small pure-torch LLaMA-style model for tests.
Runtime: :mod:`.packed` (PackedLinear, packed int4/int8 weights read by :mod:`.gemv`'s kernel),
:mod:`.offload` (blocks on disk under ``max_memory``), :mod:`.export` (MatMulNBits ONNX export).
"""
