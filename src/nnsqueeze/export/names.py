"""Short value names for exported quantized graphs (pure ONNX rewriting; the computation is unchanged).

The TorchScript exporter names every intermediate value after its module path
(``/model/encoder/encoder/layer.0/attention/self/query/DynamicQuantizeLinear_output_0``): on
all-MiniLM-L6-v2 those strings are ~120 KB of a 23 MB int8 file, more than its int8 embedding
scales. :func:`compact_value_names` renames every value that is neither a graph input nor a graph
output (intermediate tensors, initializers, Constant outputs) to ``v<N>``; node names keep the
module path, so a node is still traceable to its layer (Netron shows them). ::

    >>> from onnx import helper
    >>> relu = helper.make_node("Relu", ["x"], ["/model/layer/Relu_output_0"], name="/model/layer/Relu")
    >>> g = helper.make_graph([relu, helper.make_node("Neg", ["/model/layer/Relu_output_0"], ["y"])], "g",
    ...                       [helper.make_tensor_value_info("x", 1, [2])],
    ...                       [helper.make_tensor_value_info("y", 1, [2])])
    >>> m = helper.make_model(g); compact_value_names(m)
    1
    >>> [list(n.input) for n in m.graph.node], m.graph.node[0].name
    ([['x'], ['v0']], '/model/layer/Relu')
"""

from __future__ import annotations


def compact_value_names(model) -> int:
    """Rename internal values of ``model`` (onnx.ModelProto, edited in place); returns how many."""
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    new: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in new:
            new[name] = f"v{len(new)}"
        return new[name]

    for init in g.initializer:
        init.name = short(init.name)
    for n in g.node:
        for i, x in enumerate(n.input):
            n.input[i] = short(x)
        for i, x in enumerate(n.output):
            n.output[i] = short(x)
        if any(a.type in (5, 10) for a in n.attribute):  # GRAPH / GRAPHS: subgraphs may read outer names
            raise ValueError("compact_value_names does not rewrite graphs with subgraphs")
    for vi in g.value_info:
        vi.name = short(vi.name)
    return len(new)
