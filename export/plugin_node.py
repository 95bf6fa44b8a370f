"""The ONNX node that stands for one multi-scale deformable attention call in the TensorRT plugin graph.

Node contract (what ``csrc/tensorrt/`` implements and what the TensorRT ONNX parser hands to the plugin registry):

- domain ``trt.plugins``, op_type ``DinoMSDeformAttn``: the parser looks an unknown op_type up as a plugin name.
- attributes ``plugin_version = "1"`` and ``plugin_namespace = ""``; the plugin library registers its creator under
  the namespace ``""`` and, for parsers (TensorRT >= 10.10) that read the node's domain as the namespace, also under
  ``"trt.plugins"``.
- inputs: ``value (B, S, M, D)``, ``spatial_shapes (L, 2) int32``, ``level_start_index (L,) int32``,
  ``sampling_locations (B, Q, M, L, P, 2)``, ``attention_weights (B, Q, M, L, P)``; value, locations and weights share
  one float type (float32, float16 or bfloat16).
- output: ``(B, Q, M, D)`` in the value's type (the layout of TensorRT's own ``MultiscaleDeformableAttnPlugin_TRT``);
  the graph reshapes it to ``(B, Q, M * D)`` right after the node.

ONNX Runtime's CPU and CUDA providers cannot run this node. :func:`attach_reference_function` gives a copy of the
model a local ONNX function of the same name built from standard operators (GridSample), so ONNX Runtime can run and
check the plugin graph on any machine.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_NAME = "DinoMSDeformAttn"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
PLUGIN_INPUTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
PLUGIN_FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")


def register_onnx_schema() -> None:
    """Registers the node's schema with onnx so onnxscript can emit it (idempotent).

    onnxscript only builds nodes whose schema onnx knows; the registration is process-local and changes nothing in
    the saved file.
    """
    try:
        onnx.defs.get_schema(PLUGIN_NAME, 1, PLUGIN_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    formal = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    schema = onnx.defs.OpSchema(
        PLUGIN_NAME,
        PLUGIN_DOMAIN,
        1,
        "Multi-scale deformable attention, executed by the dino TensorRT plugin (csrc/tensorrt/).",
        inputs=[
            formal("value", "T"),
            formal("spatial_shapes", "tensor(int32)"),
            formal("level_start_index", "tensor(int32)"),
            formal("sampling_locations", "T"),
            formal("attention_weights", "T"),
        ],
        outputs=[formal("output", "T")],
        type_constraints=[("T", list(PLUGIN_FLOAT_TYPES), "value, locations, weights and output share one type")],
        attributes=[
            attr("plugin_version", onnx.defs.OpSchema.AttrType.STRING, "plugin creator version"),
            attr("plugin_namespace", onnx.defs.OpSchema.AttrType.STRING, "plugin creator namespace"),
        ],
    )
    onnx.defs.register_schema(schema)


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The plugin nodes of the main graph, in graph order."""
    return [n for n in model.graph.node if n.domain == PLUGIN_DOMAIN and n.op_type == PLUGIN_NAME]


def _reference_function(num_levels: int, opset: int) -> onnx.FunctionProto:
    """An ONNX function computing the plugin's output with GridSample, for ``num_levels`` levels.

    Same math as ``dino.ops.ms_deform_attn_pytorch``: per level, the value map (B*M, D, H, W) is sampled bilinearly
    (zero padding, align_corners=0) at grid = 2 * loc - 1, and the samples are summed with the attention weights.
    """
    nodes: list[onnx.NodeProto] = []

    def const(name: str, values: list[int]) -> str:
        nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                      [len(values)], values)))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    const("c0", [0])
    const("c1", [1])
    const("c2", [2])
    const("c3", [3])
    const("cm1", [-1])
    node("Shape", ["value"], "vshape")
    node("Gather", ["vshape", "c0"], "B", axis=0)
    node("Gather", ["vshape", "c2"], "M", axis=0)
    node("Gather", ["vshape", "c3"], "D", axis=0)
    node("Mul", ["B", "M"], "BM")
    node("Shape", ["sampling_locations"], "lshape")
    node("Gather", ["lshape", "c1"], "Q", axis=0)
    node("Cast", ["spatial_shapes"], "shapes64", to=TensorProto.INT64)
    node("Cast", ["level_start_index"], "starts64", to=TensorProto.INT64)
    # grid = 2 * loc - 1, laid out (B, M, Q, L, P, 2) so each level slice reshapes to (B*M, Q, P, 2).
    nodes.append(helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])))
    nodes.append(helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])))
    node("CastLike", ["two", "sampling_locations"], "two_t")
    node("CastLike", ["one", "sampling_locations"], "one_t")
    node("Mul", ["sampling_locations", "two_t"], "loc2")
    node("Sub", ["loc2", "one_t"], "grid")
    node("Transpose", ["grid"], "grid_t", perm=[0, 2, 1, 3, 4, 5])
    node("Concat", ["BM", "Q", "cm1", "c2"], "grid_shape", axis=0)
    sampled = []
    for lvl in range(num_levels):
        li = const(f"l{lvl}", [lvl])
        node("Gather", ["shapes64", li], f"hw{lvl}", axis=0)  # (1, 2)
        node("Reshape", [f"hw{lvl}", "cm1"], f"hw{lvl}_flat")
        node("ReduceProd", [f"hw{lvl}_flat"], f"n{lvl}", keepdims=1)
        node("Gather", ["starts64", li], f"s{lvl}", axis=0)
        node("Add", [f"s{lvl}", f"n{lvl}"], f"e{lvl}")
        node("Slice", ["value", f"s{lvl}", f"e{lvl}", "c1"], f"v{lvl}")  # (B, HW, M, D)
        node("Transpose", [f"v{lvl}"], f"vt{lvl}", perm=[0, 2, 3, 1])  # (B, M, D, HW)
        node("Concat", ["BM", "D", f"hw{lvl}_flat"], f"vshape{lvl}", axis=0)
        node("Reshape", [f"vt{lvl}", f"vshape{lvl}"], f"vmap{lvl}")  # (B*M, D, H, W)
        node("Gather", ["grid_t", li], f"g{lvl}", axis=3)  # (B, M, Q, 1, P, 2)
        node("Reshape", [f"g{lvl}", "grid_shape"], f"gr{lvl}")  # (B*M, Q, P, 2)
        mode = "linear" if opset >= 20 else "bilinear"
        node("GridSample", [f"vmap{lvl}", f"gr{lvl}"], f"smp{lvl}", mode=mode, padding_mode="zeros", align_corners=0)
        node("Unsqueeze", [f"smp{lvl}", "c3"], f"smpu{lvl}")  # (B*M, D, Q, 1, P)
        sampled.append(f"smpu{lvl}")
    node("Concat", sampled, "stacked", axis=3)  # (B*M, D, Q, L, P)
    node("Transpose", ["attention_weights"], "w_t", perm=[0, 2, 1, 3, 4])  # (B, M, Q, L, P)
    node("Shape", ["attention_weights"], "wshape")
    node("Slice", ["wshape", "c3", const("c5", [5])], "LP")
    node("Concat", ["BM", "c1", "Q", "LP"], "w_shape", axis=0)
    node("Reshape", ["w_t", "w_shape"], "w_r")  # (B*M, 1, Q, L, P)
    node("Mul", ["stacked", "w_r"], "weighted")
    node("ReduceSum", ["weighted", const("axes34", [3, 4])], "summed", keepdims=0)  # (B*M, D, Q)
    node("Concat", ["B", "M", "D", "Q"], "o_shape", axis=0)
    node("Reshape", ["summed", "o_shape"], "o4")  # (B, M, D, Q)
    node("Transpose", ["o4"], "output", perm=[0, 3, 1, 2])  # (B, Q, M, D)
    return helper.make_function(
        PLUGIN_DOMAIN,
        PLUGIN_NAME,
        list(PLUGIN_INPUTS),
        ["output"],
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["plugin_version", "plugin_namespace"],
    )


def attach_reference_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose plugin nodes ONNX Runtime can run (via a local function of standard operators).

    For validation only: never ship the result to TensorRT, whose parser would inline the function instead of
    calling the plugin.
    """
    nodes = plugin_nodes(model)
    if not nodes:
        raise ValueError("the model has no DinoMSDeformAttn plugin node")
    inits = {i.name: i for i in model.graph.initializer}
    levels = set()
    for n in nodes:
        shapes = inits.get(n.input[1])
        if shapes is not None:
            levels.add(int(shapes.dims[0]))
        else:  # shapes from a Constant node
            for c in model.graph.node:
                if c.op_type == "Constant" and c.output[0] == n.input[1]:
                    levels.add(int(c.attribute[0].t.dims[0]))
    if len(levels) != 1:
        raise ValueError(f"cannot tell the number of feature levels of the plugin nodes (found {sorted(levels)})")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.functions.append(_reference_function(levels.pop(), opset))
    return out
