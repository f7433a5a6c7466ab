"""SmoothQuant graph rewriting (halflife_export.smoothquant) on a small
hand-built graph: a LayerNorm with outlier channels feeding MatMuls, as in a
transformer block."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from halflife_export import smoothquant

C, HIDDEN = 16, 32
OUTLIERS = [3, 11]  # channels the LayerNorm scales 40x, like a transformer's


def block() -> onnx.ModelProto:
    """x -> LayerNorm -> {MatMul a, MatMul b (one site), MatMul t1/t2 (a tied
    weight)}; a -> Relu -> MatMul down (no LayerNorm before it); down + the
    LayerNorm output (the residual) -> y."""
    rng = np.random.default_rng(0)
    gamma = np.ones(C, np.float32)
    gamma[OUTLIERS] = 40.0

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "w_a"], ["a"], name="a"),
        helper.make_node("MatMul", ["ln", "w_b"], ["b"], name="b"),
        helper.make_node("MatMul", ["ln", "w_tied"], ["t1"], name="t1"),
        helper.make_node("MatMul", ["ln", "w_tied"], ["t2"], name="t2"),
        helper.make_node("Relu", ["a"], ["relu"], name="relu"),
        helper.make_node("MatMul", ["relu", "w_down"], ["down"], name="down"),
        helper.make_node("Add", ["down", "ln"], ["y"], name="residual"),
    ]
    initializers = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.zeros(C, np.float32), "beta"),
        weight("w_a", (C, HIDDEN)),
        weight("w_b", (C, C)),
        weight("w_tied", (C, C)),
        weight("w_down", (HIDDEN, C)),
    ]
    shape = ["batch", "tokens", C]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("y", "b", "t1", "t2")]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", C])],
        outputs, initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def inputs(seed: int, batch: int = 4, tokens: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, tokens, C)).astype(np.float32)


def calibrated(model: onnx.ModelProto, sites) -> dict[str, np.ndarray]:
    names = [site.activation for site in sites]
    values = run(smoothquant.with_outputs(model, names), inputs(1))[-len(names):]
    mask = np.ones(inputs(1).shape[:2])
    return {name: smoothquant.channel_peaks(value, mask) for name, value in zip(names, values)}


def test_sites_are_the_matmuls_that_read_a_normalization():
    sites = smoothquant.find_sites(block())
    # a and b share one smoothing; t1/t2 share a weight (scaling it for one
    # would change the other); down reads a Relu, which has no outliers to move.
    assert sites == [smoothquant.Site(activation="ln", nodes=("a", "b"), weights=("w_a", "w_b"))]


def test_with_outputs_leaves_the_model_alone():
    model = block()
    extended = smoothquant.with_outputs(model, ["ln"])
    assert [o.name for o in extended.graph.output] == ["y", "b", "t1", "t2", "ln"]
    assert [o.name for o in model.graph.output] == ["y", "b", "t1", "t2"]


def test_smoothing_keeps_the_float_function():
    model = block()
    before = run(model, inputs(2))
    sites = smoothquant.find_sites(model)
    assert smoothquant.smooth(model, sites, calibrated(model, sites)) == ["a", "b"]
    onnx.checker.check_model(model)
    after = run(model, inputs(2))
    for want, got in zip(before, after):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # It did rewrite: a Mul on the edges into a and b only; the residual still reads the LayerNorm.
    by_name = {node.name: node for node in model.graph.node}
    assert by_name["a"].input[0] == by_name["b"].input[0] == by_name["SmoothQuant_0"].output[0]
    assert by_name["residual"].input[1] == by_name["t1"].input[0] == "ln"
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert not np.allclose(weights["w_a"], numpy_helper.to_array(block().graph.initializer[2]))


def test_scales_at_half_migration_balance_activation_and_weight():
    rng = np.random.default_rng(3)
    activation, weight = rng.uniform(0.1, 50, C), rng.uniform(0.01, 2, C)
    s = smoothquant.smoothing_scales(activation, weight, alpha=0.5)
    np.testing.assert_allclose(activation / s, weight * s, rtol=1e-5)
    assert np.isfinite(smoothquant.smoothing_scales(np.zeros(C), np.zeros(C))).all()


def test_channel_peaks_ignore_padding():
    activation = np.ones((2, 3, C), np.float32)
    activation[1, 2] = 1000.0  # a padded position
    activation[0, 0, 5] = -7.0
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    peaks = smoothquant.channel_peaks(activation, mask)
    assert peaks[5] == 7.0 and np.delete(peaks, 5).tolist() == [1.0] * (C - 1)


def test_smoothing_shrinks_the_int8_error(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def int8_error(model: onnx.ModelProto, nodes) -> float:
        source, target = tmp_path / "source.onnx", tmp_path / "int8.onnx"
        onnx.save(model, str(source))
        quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=nodes)
        got, want = run(onnx.load(str(target)), inputs(4))[1], run(block(), inputs(4))[1]  # output of b
        return float(np.abs(got - want).max() / np.abs(want).max())

    plain = int8_error(block(), ["a", "b"])
    model = block()
    sites = smoothquant.find_sites(model)
    smoothed = int8_error(model, smoothquant.smooth(model, sites, calibrated(model, sites)))
    assert smoothed < plain / 2, (smoothed, plain)


@pytest.mark.parametrize("op", ["Relu", "Identity"])
def test_no_sites_without_a_normalization(op):
    model = block()
    model.graph.node[0].CopyFrom(helper.make_node(op, ["x"], ["ln"], name="ln"))
    assert smoothquant.find_sites(model) == []
