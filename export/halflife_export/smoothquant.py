"""SmoothQuant-style int8 for CPUs: move activation outliers into the weights.

Dynamic int8 quantizes each activation tensor with one scale per batch, so a
few outlier channels (a transformer's LayerNorm outputs have some, 10-50x
the rest) leave the other channels a handful of int8 steps: all-MiniLM-L6-v2
lost up to 3% cosine that way. Smoothing (Xiao et al. 2023, SmoothQuant)
divides channel j of such an activation by s_j and multiplies row j of the
weight that reads it by s_j, which leaves the product unchanged and both
sides easy to quantize, with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

from calibration texts. Here the division is a `Mul` on the edge into the
matrix multiplication (the LayerNorm output also feeds the residual, which
must stay as it is), and only the smoothed MatMul / Attention nodes become
int8; the rest (the FFN's second MatMul, whose GELU input no LayerNorm
precedes, and the attention output) stay fp32.

Graph functions on `onnx.ModelProto`, without I/O; the exporter runs the
calibration and the quantizer.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

# Ops whose outputs carry the per-channel outliers smoothing is for.
NORMALIZATIONS = frozenset(
    {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}
)
# Ops that multiply their first input by a 2-D initializer (in_channels, out):
# Attention's is the packed Q, K, V weight.
WEIGHTED = frozenset({"MatMul", "Attention"})
ALPHA = 0.5  # migration strength; 0.5-0.8 measured alike on all-MiniLM-L6-v2 (docs/embedding.md)
_FLOOR = 1e-5  # keeps s finite for channels that never fire in calibration


@dataclasses.dataclass(frozen=True)
class Site:
    """One activation tensor to smooth and the weighted nodes that read it."""

    activation: str  # tensor name, the output of a normalization
    nodes: tuple[str, ...]  # node names (MatMul / Attention)
    weights: tuple[str, ...]  # their weight initializers, (in_channels, out) each


def find_sites(model) -> list[Site]:
    """The normalization outputs that feed MatMul / Attention nodes with
    2-D initializer weights, grouped by activation (Q, K and V of an unfused
    graph share one smoothing). Nodes without names (the quantizer selects
    nodes by name) and weights that other nodes read too are skipped."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    weights = {init.name: init for init in graph.initializer}
    readers = collections.Counter(name for node in graph.node for name in node.input)
    found: dict[str, list] = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED or len(node.input) < 2 or not node.name:
            continue
        source = producers.get(node.input[0])
        weight = weights.get(node.input[1])
        if source is None or source.op_type not in NORMALIZATIONS or weight is None or len(weight.dims) != 2:
            continue
        if readers[node.input[1]] != 1:  # a shared (tied) weight would be scaled for every reader
            continue
        found.setdefault(node.input[0], []).append((node.name, node.input[1]))
    return [Site(act, tuple(n for n, _ in pairs), tuple(w for _, w in pairs)) for act, pairs in found.items()]


def with_outputs(model, names):
    """A copy of `model` that also outputs the tensors `names` (for calibration)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def channel_peaks(activation: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """max |x| per channel over the real (unpadded) tokens.
    activation: (batch, tokens, channels); mask: (batch, tokens) 0/1. Returns (channels,)."""
    return np.abs(np.where(mask[..., None] > 0, activation, 0)).max(axis=(0, 1))


def smoothing_scales(activation_peaks: np.ndarray, weight_peaks: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """s = max|X|^alpha / max|W|^(1 - alpha), per channel.
    activation_peaks, weight_peaks: (channels,). Returns (channels,) float32."""
    a = np.maximum(np.asarray(activation_peaks, dtype=np.float64), _FLOOR)
    w = np.maximum(np.asarray(weight_peaks, dtype=np.float64), _FLOOR)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def smooth(model, sites: list[Site], peaks: dict[str, np.ndarray], alpha: float = ALPHA) -> list[str]:
    """Smooths `model` in place: for each site, a Mul by 1/s on the edges into
    its nodes and each weight's rows times s. peaks: activation name ->
    (channels,) calibration max |x|. Returns the names of the smoothed nodes."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    smoothed = []
    for k, site in enumerate(sites):
        weights = [numpy_helper.to_array(initializers[w]) for w in site.weights]
        s = smoothing_scales(peaks[site.activation], np.max([np.abs(w).max(axis=1) for w in weights], axis=0), alpha)
        for name, w in zip(site.weights, weights):
            initializers[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
        inverse, scaled = f"smoothquant_{k}_inverse_scale", f"smoothquant_{k}_output"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        mul = helper.make_node("Mul", [site.activation, inverse], [scaled], name=f"SmoothQuant_{k}")
        first = min(list(graph.node).index(nodes[n]) for n in site.nodes)
        graph.node.insert(first, mul)  # topological order: before its first reader
        for name in site.nodes:
            nodes[name].input[0] = scaled
            smoothed.append(name)
    return smoothed
