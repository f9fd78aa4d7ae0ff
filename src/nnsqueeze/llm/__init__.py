"""Post-training compression of causal language models, block by block.

Pure math, one technique per file: :mod:`.rtn`, :mod:`.gptq`, :mod:`.awq`, :mod:`.smoothquant`,
:mod:`.sparsegpt`, :mod:`.wanda`. :mod:`.sequential` walks the decoder blocks of a model and applies
one of them to every targeted Linear; :mod:`.tiny` is a small pure-torch LLaMA-style model for tests.
"""
