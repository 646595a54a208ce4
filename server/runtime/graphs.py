"""The ONNX graphs the runtimes build around a bundle's model at load time (with ``onnx``).

- ``step_graph``: the model with a Gather of its state rows from the slabs in front and an in-place
  ScatterND behind (the device runtime's one run per batch, device.py);
- ``helper_graphs``: the Gather and the ScatterND alone (generation cohorts on the device);
- ``top_k_head_graph``: the model plus the top-k ids and log-probabilities of its last position,
  so a lone step's answer comes out of the same ONNX Runtime run (cpu.py).

The bundle's ``model.onnx`` itself is never changed; these are built in memory and handed to ORT.
"""

from __future__ import annotations


def onnx_module():
    """The ``onnx`` package, or ImportError saying what needs it."""
    try:
        import onnx
    except ImportError:
        raise ImportError("building serving graphs needs the 'onnx' package (pip install onnx)") from None
    return onnx


# The pieces the slab graphs are made of: slabs [layers, slots, hidden] indexed by ``slots``
# (Gather) or written at ``where`` (ScatterND, indices from scatter_index).
def _value(name: str, dims: list, integer: bool = False):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.INT64 if integer else TensorProto.FLOAT, dims)


_SLAB, _ROWS = ["layers", "slots", "hidden"], ["layers", "batch", "hidden"]


def _index_inputs() -> list:
    return [_value("slots", ["batch"], integer=True), _value("where", ["layers", "batch", 2], integer=True)]


def _gather_node(i: int, out: str):
    from onnx import helper

    return helper.make_node("Gather", [f"slab{i}", "slots"], [out], axis=1, name=f"gather{i}")


def _scatter_node(i: int, rows: str, out: str):
    from onnx import helper

    return helper.make_node("ScatterND", [f"slab{i}", "where", rows], [out], name=f"scatter{i}")


def helper_graphs(n_states: int) -> tuple[bytes, bytes]:
    """(gather model, scatter model) over ``n_states`` slabs, serialized."""
    helper = onnx_module().helper
    slots_in, where_in = _index_inputs()

    def model(nodes, inputs, outputs, name):
        graph = helper.make_graph(nodes, name, inputs, outputs)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="seqserve")
        m.ir_version = 8
        return m.SerializeToString()

    slabs = [_value(f"slab{i}", _SLAB) for i in range(n_states)]
    rows = [_value(f"rows{i}", _ROWS) for i in range(n_states)]
    gather = model([_gather_node(i, f"rows{i}") for i in range(n_states)], slabs + [slots_in], rows, "gather_rows")
    scatter = model(
        [_scatter_node(i, f"rows{i}", f"out{i}") for i in range(n_states)],
        slabs + [where_in] + rows,
        [_value(f"out{i}", _SLAB) for i in range(n_states)],
        "scatter_rows",
    )
    return gather, scatter


def step_graph(model_path, state_inputs: list[str], state_outputs: list[str]) -> bytes:
    """The model with the slabs' gather in front and their in-place scatter behind, serialized.

    Inputs: the model's token/feature input, ``slots`` [batch], ``where`` [layers, batch, 2] and
    ``slab{i}``; outputs: the model's other outputs (the logits) and ``slab_out{i}`` (bound to the
    same memory as ``slab{i}``)."""
    onnx = onnx_module()
    model = onnx.load(str(model_path))
    graph = model.graph
    inputs = [v for v in graph.input if v.name not in state_inputs] + _index_inputs()
    outputs = [v for v in graph.output if v.name not in state_outputs]
    n = len(state_inputs)
    inputs += [_value(f"slab{i}", _SLAB) for i in range(n)]
    outputs += [_value(f"slab_out{i}", _SLAB) for i in range(n)]
    # the gathers first and the scatters last: nodes stay in topological order
    nodes = (
        [_gather_node(i, state_in) for i, state_in in enumerate(state_inputs)]
        + list(graph.node)
        + [_scatter_node(i, state_out, f"slab_out{i}") for i, state_out in enumerate(state_outputs)]
    )
    for field, values in ((graph.input, inputs), (graph.output, outputs), (graph.node, nodes)):
        del field[:]
        field.extend(values)
    onnx.checker.check_model(model)
    return model.SerializeToString()


# The top-k head's extra input and outputs (prefixed so they never meet a model's own names).
HEAD_K = "seqserve_top_k"
HEAD_IDS = "seqserve_top_ids"
HEAD_LOGPROBS = "seqserve_top_logprobs"
HEAD_MIN_OPSET = 11  # Gather with a negative index, TopK with k as an input


def top_k_head_graph(model_path, logits_name: str) -> bytes | None:
    """The model plus a head on its last position's logits, serialized; None for an opset too old.

    Extra input ``seqserve_top_k`` int64 [1] (k, at most the logits' width); extra outputs
    ``seqserve_top_ids`` int64 [batch, k], ids by descending logit, and ``seqserve_top_logprobs``
    float [batch, k], their log-softmax values. Every other input and output stays as it was."""
    onnx = onnx_module()
    helper, T = onnx.helper, onnx.TensorProto
    model = onnx.load(str(model_path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < HEAD_MIN_OPSET:
        return None
    p = "seqserve_head_"
    nodes = [
        helper.make_node("Constant", [], [p + "last"], value=helper.make_tensor(p + "minus_one", T.INT64, [], [-1])),
        helper.make_node("Gather", [logits_name, p + "last"], [p + "rows"], axis=1),
    ]  # [batch, width]
    if opset >= 18:  # ReduceLogSumExp's axes became an input
        nodes += [
            helper.make_node("Constant", [], [p + "axes"], value=helper.make_tensor(p + "one", T.INT64, [1], [1])),
            helper.make_node("ReduceLogSumExp", [p + "rows", p + "axes"], [p + "log_norm"], keepdims=1),
        ]
    else:
        nodes.append(helper.make_node("ReduceLogSumExp", [p + "rows"], [p + "log_norm"], axes=[1], keepdims=1))
    nodes += [
        helper.make_node("TopK", [p + "rows", HEAD_K], [p + "values", HEAD_IDS], axis=1, largest=1, sorted=1),
        helper.make_node("Sub", [p + "values", p + "log_norm"], [HEAD_LOGPROBS]),
    ]
    graph = model.graph
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(HEAD_K, T.INT64, [1]))
    graph.output.extend(
        [
            helper.make_tensor_value_info(HEAD_IDS, T.INT64, ["batch", "k"]),
            helper.make_tensor_value_info(HEAD_LOGPROBS, T.FLOAT, ["batch", "k"]),
        ]
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()
