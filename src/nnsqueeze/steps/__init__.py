"""Built-in steps; each module registers itself in :data:`nnsqueeze.registry.STEPS`."""

__all__ = ["prune", "finetune", "quantize", "channel_prune", "nm_prune", "group_lasso", "cluster", "lowrank", "distill", "share", "quantize_dynamic", "rtn", "half", "gptq", "awq", "smoothquant", "sparsegpt", "wanda", "mixed", "qat", "mixed_precision", "rotate"]
