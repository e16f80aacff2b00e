"""The SavedModel stripper on ops beyond plain convolutions: LayerNormalization, dilated and transposed
convolutions, resizing, upsampling, cropping, GELU; bias folding that converters accept; errors and reasons."""

import functools
import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
L = keras.layers

from conftest import rel_error  # noqa: E402
from test_channel_engine import split_model  # noqa: E402
from tfcompress.errors import ExportError  # noqa: E402
from tfcompress.graph.graphdef_adapter import KINDS, register  # noqa: E402
from tfcompress.stripping.savedmodel_strip import freeze_saved_model, strip_saved_model  # noqa: E402


class _Zeroer:
    """Builds conv [-> BatchNormalization] -> ReLU blocks and zeroes 25 % of every block's output channels
    (kernel slice, bias, BN gamma and beta), independently of the channel engine under test."""

    def __init__(self):
        self.blocks = []

    def __call__(self, x, conv, bn=True):
        norm = L.BatchNormalization() if bn else None
        self.blocks.append((conv, norm))
        y = conv(x)
        return L.ReLU()(norm(y) if norm is not None else y)

    def zero(self, rng, fraction=0.25):
        for conv, norm in self.blocks:
            kernel, bias = conv.get_weights()
            out_axis = -2 if isinstance(conv, (L.Conv2DTranspose, L.Conv3DTranspose)) else -1
            n = kernel.shape[out_axis]
            idx = rng.choice(n, int(n * fraction), replace=False)
            np.moveaxis(kernel, out_axis, -1)[..., idx] = 0.0
            bias = rng.uniform(-0.5, 0.5, n).astype("float32")
            bias[idx] = 0.0
            conv.set_weights([kernel, bias])
            if norm is not None:
                gamma, beta = rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n)
                gamma[idx] = beta[idx] = 0.0
                norm.set_weights([gamma, beta, rng.uniform(-0.1, 0.1, n), rng.uniform(0.5, 1.5, n)])


def _strip(model, tmp_path, **kw):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.export(str(src), verbose=False)
    return strip_saved_model(str(src), str(dst), **kw), dst


def _run(path, x):
    """The one output of a SavedModel's serving signature on its one input."""
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    (name,) = sig.structured_input_signature[1]
    (out,) = sig(**{name: tf.constant(x)}).values()
    return out


def _by_layer(result, layer):
    """The report rows of a Keras layer's ops (exported as ``.../<layer>[_k]/<op>``)."""
    return [r for r in result.layers if re.search(rf"/{layer}(_\d+)?/", r["name"])]


def _ops_model(rng):
    z = _Zeroer()
    inp = keras.Input((16, 16, 3))
    x = z(inp, L.Conv2D(8, 3, padding="same", name="stem"))
    x = z(x, L.Conv2D(8, 3, padding="same", dilation_rate=2, name="dilated"))
    x = z(x, L.Conv2D(8, 1, name="before_norm"))
    x = L.LayerNormalization()(x)  # normalises over the channels: what reaches it stays
    x = z(x, L.Conv2DTranspose(8, 3, strides=2, padding="same", name="transposed"))
    x = L.Resizing(24, 24)(x)
    # (a BatchNormalization after Resizing is exported in training mode by Keras 3.15: none here)
    x = z(x, L.Conv2D(8, 3, padding="same", name="after_resize"), bn=False)
    x = L.UpSampling2D()(x)
    x = L.Cropping2D(((1, 2), (0, 1)))(x)
    x = z(x, L.Conv2D(8, 3, activation="gelu", name="gelu"), bn=False)
    x = L.Conv2D(4, 1, name="head")(L.GlobalAveragePooling2D(keepdims=True)(x))
    model = keras.Model(inp, x)
    z.zero(rng)
    return model


def _conv_macs(model):
    """Multiply-accumulates of the model's Conv2D / Conv2DTranspose layers, from Keras' own shapes."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, (L.Conv2D, L.Conv2DTranspose)):
            k = layer.kernel.shape  # (h, w, in, out); transposed: (h, w, out, in)
            spatial = layer.input.shape[1:3] if isinstance(layer, L.Conv2DTranspose) else layer.output.shape[1:3]
            total += int(np.prod(spatial)) * int(np.prod(k))
    return total


def test_layer_norm_dilated_transposed_resize_upsample_crop_gelu(tmp_path, rng):
    model = _ops_model(rng)
    result, dst = _strip(model, tmp_path)
    x = rng.uniform(0, 1, (3, 16, 16, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4
    assert result.max_rel_error < 1e-4
    after = {name: _by_layer(result, name)[0]["channels_after"]
             for name in ("stem", "dilated", "before_norm", "transposed", "after_resize", "gelu", "head")}
    # 25 % of 8 removed everywhere, except before the channel LayerNormalization and at the output
    assert after == {"stem": 6, "dilated": 6, "before_norm": 8, "transposed": 6, "after_resize": 6,
                     "gelu": 6, "head": 4}
    assert result.params_after < result.params_before
    # dilated and transposed convolutions are counted like Keras' shapes say
    assert result.flops_before == pytest.approx(2 * _conv_macs(model), rel=1e-6)
    assert result.flops_after < 0.8 * result.flops_before


def test_spatial_layer_norm_is_per_channel(tmp_path, rng):
    """LayerNormalization over the spatial axes normalises each channel alone, then scales each position:
    a zeroed channel stays 0 (0 * rsqrt(0 + eps)) and goes."""
    z = _Zeroer()
    inp = keras.Input((8, 8, 3))
    x = z(inp, L.Conv2D(8, 3, padding="same", name="c1"), bn=False)
    norm = L.LayerNormalization(axis=(1, 2), center=False)
    x = L.Conv2D(4, 1, name="c2")(norm(x))
    model = keras.Model(inp, x)
    z.zero(rng)
    norm.set_weights([rng.uniform(0.5, 1.5, (8, 8)).astype("float32")])
    result, dst = _strip(model, tmp_path)
    assert _by_layer(result, "c1")[0]["channels_after"] == 6
    x = rng.uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4


def test_channel_layer_norm_with_nothing_zeroed_is_kept_whole(tmp_path, rng):
    inp = keras.Input((8, 8, 3))
    x = L.LayerNormalization()(L.Conv2D(8, 3, padding="same", name="c1")(inp))
    model = keras.Model(inp, L.Conv2D(4, 1, name="c2")(x))
    result, dst = _strip(model, tmp_path)
    assert [r["channels_after"] for r in result.layers] == [8, 4]
    x = rng.uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4


def _folding_model(rng):
    """Zeroed channels whose BatchNorm beta stays: constants that the next 1x1 convolution folds into its bias."""
    z = _Zeroer()
    inp = keras.Input((12, 12, 3))
    x = z(inp, L.Conv2D(8, 3, padding="same", name="c1"))
    x = z(x, L.Conv2D(8, 1, name="c2"))
    model = keras.Model(inp, L.Conv2D(4, 1, name="c3")(x))
    z.zero(rng)
    for conv, norm in z.blocks:
        gamma, beta, mean, var = norm.get_weights()
        beta[gamma == 0] = rng.uniform(0.2, 0.5, int((gamma == 0).sum()))  # relu(beta) > 0: a constant
        norm.set_weights([gamma, beta, mean, var])
    return model


def test_folded_constant_joins_the_existing_bias_and_converts_to_onnx(tmp_path, rng):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import tf2onnx

    model = _folding_model(rng)
    result, dst = _strip(model, tmp_path)
    assert [r["channels_after"] for r in result.layers] == [6, 6, 4]
    frozen = freeze_saved_model(str(dst))
    nodes = {n.name: n for n in frozen.graph_def.node}
    for n in frozen.graph_def.node:
        if n.op in ("BiasAdd", "Add", "AddV2"):
            src = nodes[n.input[0].split(":")[0]]
            assert src.op not in ("BiasAdd",), f"{n.name} adds a second bias after {src.name}"
    names = [frozen.inputs[k] for k in sorted(frozen.inputs)]
    outs = [frozen.outputs[k] for k in sorted(frozen.outputs)]
    proto, _ = tf2onnx.convert.from_graph_def(frozen.graph_def, input_names=names, output_names=outs, opset=17)
    onnx.checker.check_model(proto)
    assert all(len(n.input) <= 3 for n in proto.graph.node if n.op_type == "Conv")
    x = rng.uniform(0, 1, (2, 12, 12, 3)).astype("float32")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert rel_error(got, model(x)) < 1e-4


def test_freezing_failure_is_an_export_error(tmp_path):
    """Keras 3.15 exports a BatchNormalization after Resizing in training mode (it assigns its statistics)."""
    inp = keras.Input((8, 8, 3))
    x = L.BatchNormalization()(L.Resizing(12, 12)(L.Conv2D(4, 3)(inp)))
    model = keras.Model(inp, x)
    model.export(str(tmp_path / "src"), verbose=False)
    with pytest.raises(ExportError, match="cannot freeze the 'serving_default' signature"):
        strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("shared", [False, True])
def test_parameters_count_every_layer_and_a_shared_weight_once(shared, tmp_path, rng):
    """Untrained convolutions have equal zero biases: each counts. A layer called twice (its bias random too) is
    frozen into two copies of its weights: they count once, as Keras counts the layer."""
    inp = keras.Input((8, 8, 3))
    bias = "random_normal" if shared else "zeros"
    convs = [L.Conv2D(3, 3, padding="same", bias_initializer=bias) for _ in range(3)]
    x = convs[0](inp)
    x = convs[1](convs[1](x)) if shared else convs[2](convs[1](x))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    model.export(str(tmp_path / "src"), verbose=False)
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert result.params_before == result.params_after == model.count_params()


def test_a_signature_input_no_output_reads_stays_an_input(tmp_path, rng):
    """Callers feed every input of a signature, read or not: the stripped SavedModel and the export take it too
    (freezing and stripping used to drop its placeholder, and feeding it failed)."""
    from tfcompress.export import export_saved_model

    class Two(tf.Module):
        def __init__(self):
            self.w = tf.Variable(rng.normal(size=(1, 1, 3, 8)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 3], tf.float32, name="a"),
                                      tf.TensorSpec([None, 2], tf.float32, name="unused")])
        def serve(self, a, unused):
            h = tf.nn.conv2d(a, self.w, 1, "SAME")
            return {"y": tf.reduce_mean(h, [1, 2])}

    m = Two()
    tf.saved_model.save(m, str(tmp_path / "src"), signatures={"serving_default": m.serve})
    x = {"a": rng.normal(size=(4, 6, 6, 3)).astype(np.float32), "unused": np.zeros((4, 2), np.float32)}
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"), check_inputs=x)
    assert set(result.signature.structured_input_signature[1]) == {"a", "unused"}
    assert result.max_rel_error < 1e-5
    report = export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"), int8="none", verbose=False)
    assert report["steps"]["openvino"]["max_rel_error"] < 1e-4


def test_an_op_type_has_one_rule():
    assert KINDS["Conv2DBackpropInput"] is KINDS["Conv2D"]
    with pytest.raises(ValueError, match="'Conv2D' already has a channel rule"):
        register("Conv2D")(lambda g, node: None)


def test_kept_zeroed_channels_carry_reasons(tmp_path, rng):
    """Inception-ResNet's conv -> BatchNorm(scale=False) -> ReLU turns a zeroed channel into the constant
    relu(beta - mean / std): a 1x1 consumer folds it into its bias, a 'same'-padded 3x3 consumer cannot, so the
    channel stays, and the report says why; channels that are a model output stay too."""
    inp = keras.Input((12, 12, 3))
    norms = [L.BatchNormalization(scale=False) for _ in range(2)]
    x = L.ReLU()(norms[0](L.Conv2D(8, 3, use_bias=False, name="stem")(inp)))
    y = L.ReLU()(norms[1](L.Conv2D(8, 3, use_bias=False, name="stem2")(inp)))
    out = L.Concatenate()([L.Conv2D(4, 1, name="branch_1x1")(x), L.Conv2D(4, 3, padding="same", name="branch_3x3")(x),
                           L.Conv2D(4, 1, name="only_1x1")(y)])
    model = keras.Model(inp, out)
    for name, norm in zip(("stem", "stem2"), norms):
        kernel = model.get_layer(name).get_weights()[0]
        kernel[..., :2] = 0.0
        model.get_layer(name).set_weights([kernel])
        beta = rng.uniform(-0.2, 0.2, 8)
        beta[:2] = 0.0  # zeroed as far as the user can: scale=False leaves no gamma, the moving mean stays
        norm.set_weights([beta, rng.uniform(-0.5, -0.1, 8), rng.uniform(0.5, 1.5, 8)])
    kernel, bias = model.get_layer("branch_1x1").get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.0
    model.get_layer("branch_1x1").set_weights([kernel, bias])
    result, dst = _strip(model, tmp_path)
    row = {name: _by_layer(result, name)[0] for name in ("stem", "stem2", "branch_1x1")}
    assert (row["stem"]["zeroed"], row["stem"]["channels_after"]) == (2, 8)
    ((why, n),) = row["stem"]["kept_reasons"].items()
    assert n == 2 and "branch_3x3" in why and "SAME-padded 3x3" in why and "constant" in why
    assert (row["stem2"]["zeroed"], row["stem2"]["channels_after"], row["stem2"]["kept_reasons"]) == (2, 6, {})
    assert row["branch_1x1"]["kept_reasons"] == {"they are a model output": 1}
    assert result.kept_reasons == {why: 2, "they are a model output": 1}
    x = rng.uniform(0, 1, (2, 12, 12, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4


def test_zeroed_channels_before_a_channel_layer_norm_with_its_gamma_say_why(tmp_path, rng):
    """A zeroed channel whose LayerNormalization gamma and beta were not zeroed leaves the normalization as
    -mean / std: not constant where the next convolution reads it."""
    inp = keras.Input((8, 8, 3))
    conv = L.Conv2D(8, 3, padding="same", name="c1")
    model = keras.Model(inp, L.Conv2D(4, 1, name="c2")(L.LayerNormalization()(conv(inp))))
    kernel, bias = conv.get_weights()
    kernel[..., :2], bias[:2] = 0.0, 0.0
    conv.set_weights([kernel, bias])
    result, _ = _strip(model, tmp_path)
    ((why, n),) = _by_layer(result, "c1")[0]["kept_reasons"].items()
    assert n == 2 and "c2" in why and "not provably constant" in why


def _convnext_block_model(rng, norm):
    """A ConvNeXt stage: a depthwise 7x7 as Conv2D(groups=channels) (Keras compiles it as an XLA function),
    a channel normalization, a Dense MLP on the feature map (tensordot, shapes read at run time) with exact GELU,
    a layer scale (a ``keras.ops`` product) and a residual add. 25 % of the residual channels are zeroed through
    the whole group (stem, depthwise and output Dense kernels and biases, every normalization's parameters, the
    layer scale), and 25 % of the MLP's hidden channels."""
    inp = keras.Input((12, 12, 3))
    stem, dw = L.Conv2D(16, 2, strides=2, name="stem"), L.Conv2D(16, 7, padding="same", groups=16, name="dw")
    up, down = L.Dense(32, activation="gelu", name="up"), L.Dense(16, name="down")
    norms = [norm(epsilon=1e-6, name=f"norm{k}") for k in range(3)]
    cut, hidden = rng.choice(16, 4, replace=False), rng.choice(32, 8, replace=False)
    layer_scale = rng.uniform(0.5, 1.5, 16).astype("float32")
    layer_scale[cut] = 0.0
    x = norms[0](stem(inp))
    x = x + down(up(norms[1](dw(x)))) * layer_scale
    model = keras.Model(inp, L.Dense(5, name="head")(L.GlobalAveragePooling2D()(norms[2](x))))
    for layer, zeroed in ((stem, cut), (dw, cut), (down, cut), (up, hidden)):
        kernel, bias = layer.get_weights()
        kernel[..., zeroed] = 0.0
        bias = rng.uniform(-0.5, 0.5, bias.shape).astype("float32")
        bias[zeroed] = 0.0
        layer.set_weights([kernel, bias])
    for n in norms:
        params = [rng.uniform(0.5, 1.5, 16).astype("float32") for _ in n.get_weights()]
        for p in params:
            p[cut] = 0.0
        n.set_weights(params)
    return model


@pytest.mark.parametrize("norm", [L.LayerNormalization, functools.partial(L.LayerNormalization, center=False),
                                  L.RMSNormalization], ids=["layer_norm", "no_center", "rms_norm"])
def test_convnext_block_strips_through_channel_norms_grouped_conv_and_tensordot(tmp_path, rng, norm):
    model = _convnext_block_model(rng, norm)
    result, dst = _strip(model, tmp_path)
    x = rng.uniform(0, 1, (3, 12, 12, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4
    after = {name: _by_layer(result, name)[0]["channels_after"] for name in ("stem", "up", "down", "head")}
    assert after == {"stem": 12, "up": 24, "down": 12, "head": 5}
    assert result.params_after < 0.8 * result.params_before


@pytest.mark.parametrize("adjoint", [False, True])
def test_batch_matmul_with_one_kernel_is_a_dense(tmp_path, rng, adjoint):
    """Keras before 3.15 exports a Dense on a feature map as a BatchMatMulV2 of the [N, H, W, C] input and the
    2-D kernel: the zeroed channels reaching it go with the kernel's rows; an adjoint kernel blocks them."""
    z = _Zeroer()
    inp = keras.Input((8, 8, 3))
    x = z(inp, L.Conv2D(8, 3, name="stem"))
    kernel = rng.normal(0, 1, (6, 8) if adjoint else (8, 6)).astype("float32")
    x = L.Lambda(lambda t: tf.linalg.matmul(t, kernel, adjoint_b=adjoint))(x)
    model = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    z.zero(rng)
    result, dst = _strip(model, tmp_path)
    assert "BatchMatMulV2" in {n.op for n in freeze_saved_model(str(tmp_path / "src")).graph_def.node}
    x = rng.uniform(0, 1, (3, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4
    assert _by_layer(result, "stem")[0]["channels_after"] == (8 if adjoint else 6)


def test_check_inputs_that_do_not_fit_are_an_export_error(tmp_path):
    inp = keras.Input((8, 8, 3))
    keras.Model(inp, L.Conv2D(4, 3)(inp)).export(str(tmp_path / "src"), verbose=False)
    bad = {"keras_tensor": np.zeros((1, 5, 5, 2), "float32")}
    with pytest.raises(ExportError, match="check inputs do not fit"):
        strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"), check_inputs=bad)
    assert not (tmp_path / "dst").exists()


class _Values:
    """Hand-written op semantics for engine-only tests: fixed output constants, folding allowed or not."""

    def __init__(self, out=None, fold=False, label=""):
        self.out, self.fold, self.label = out, fold, label

    def const_out(self, in_consts):
        return [self.out if self.out is not None else in_consts[0]]

    def can_fold(self, input_index):
        return self.fold

    def fold_note(self):
        return " (no bias here)"


def test_engine_reasons_for_blocked_groups_and_kept_channels():
    """Engine only: three producers; one reaches an unknown op, one a model output, one a consumer that sees a
    non-zero constant it cannot fold on channel 1 and a non-constant on channel 2."""
    from tfcompress.graph.engine import ChannelGraph, Op, Rule

    ops = [
        Op("x", Rule.INPUT, [], [0], channels=3, semantics=_Values(np.full(3, np.nan))),
        Op("a", Rule.PRODUCER, [0], [1], channels=4, semantics=_Values(np.array([0, 0.5, np.nan, 0]))),
        Op("odd", Rule.BLOCKER, [1], [2], semantics=_Values(np.full(4, np.nan), label="Odd 'odd'")),
        Op("b", Rule.PRODUCER, [0], [3], channels=4, semantics=_Values(np.array([0, 0.5, np.nan, 0]))),
        Op("c", Rule.PRODUCER, [3], [4], channels=2, semantics=_Values(np.zeros(2), label="Conv 'c'")),
    ]
    graph = ChannelGraph(ops, [2, 4], {0: 3, 1: 4, 2: 4, 3: 4, 4: 2})
    removable, consts = graph.plan_removal()
    (b,) = graph.groups()
    assert b.layers == ("b",) and removable[b.id].tolist() == [True, False, False, True]
    why = graph.kept_reasons(removable, consts)[b.id]
    assert why == {1: "it is a non-zero constant where Conv 'c' reads it (no bias here)",
                   2: "its value where Conv 'c' reads it is not provably constant"}
    assert graph.block_reason(graph.owners(1)[0][0]) == "they reach Odd 'odd', which the channel rules do not cover"
    assert graph.block_reason(graph.owners(4)[0][0]) == "they are a model output"
    assert graph.block_reason(b.id) == ""


def test_dense_on_feature_maps_strips_and_counts_its_positions(tmp_path, rng):
    """Dense on a 4-D tensor (ConvNeXt's pointwise layers) is exported as tensordot: a Reshape to
    ``[N*H*W, C]`` whose target is computed at run time from ``Shape(x)``, a MatMul, and a Reshape back.
    Its channels go, and its multiply-accumulates count every position."""
    import tfcompress

    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same")(inp)
    x = L.Dense(8)(L.Dense(16, activation="gelu", name="expand")(x)) + x  # a raw keras.ops add
    out = L.Dense(2)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    groups = tfcompress.channel_groups(model)
    assert sorted(g.size for g in groups) == [8, 16]
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False))
    result, dst = _strip(model, tmp_path)
    stripped = tfcompress.strip(model)
    assert result.max_rel_error < 1e-4 and result.params_after < result.params_before
    assert result.flops_before == tfcompress.count_flops(model)
    assert result.flops_after == tfcompress.count_flops(stripped) < result.flops_before
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4


class _FusedBatchNormNet(tf.Module):
    """conv -> FusedBatchNormV3 (inference) -> ReLU -> 1x1 conv, as ``tf.saved_model.save`` of TF 2 / Keras 2
    code writes it (Keras 3 exports BatchNormalization as Mul/Add instead)."""

    def __init__(self, rng, zeroed, constant):
        super().__init__()
        k1 = rng.normal(0, 0.3, (3, 3, 3, 8)).astype("float32")
        gamma = rng.uniform(0.5, 1.5, 8).astype("float32")
        beta = rng.uniform(-0.2, 0.2, 8).astype("float32")
        k1[..., zeroed + constant] = 0.0
        gamma[zeroed + constant] = 0.0
        beta[zeroed] = 0.0
        beta[constant] = 0.4  # relu(0.4): a constant the 1x1 convolution folds into its bias
        self.k1, self.gamma, self.beta = tf.constant(k1), tf.constant(gamma), tf.constant(beta)
        self.mean = tf.constant(rng.uniform(-0.1, 0.1, 8).astype("float32"))
        self.var = tf.constant(rng.uniform(0.5, 1.5, 8).astype("float32"))
        self.k2 = tf.constant(rng.normal(0, 0.3, (1, 1, 8, 5)).astype("float32"))
        self.b2 = tf.constant(rng.uniform(-0.1, 0.1, 5).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 10, 10, 3], tf.float32)])
    def __call__(self, x):
        y = tf.nn.conv2d(x, self.k1, 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(x=y, scale=self.gamma, offset=self.beta, mean=self.mean,
                                        variance=self.var, epsilon=1e-3, is_training=False)[0]
        return tf.nn.bias_add(tf.nn.conv2d(tf.nn.relu(y), self.k2, 1, "VALID"), self.b2)


def test_fused_batch_norm_strips_and_folds_constant_channels(tmp_path, rng):
    net = _FusedBatchNormNet(rng, zeroed=[1, 4], constant=[6])
    src, dst = tmp_path / "src", tmp_path / "dst"
    tf.saved_model.save(net, str(src), signatures=net.__call__.get_concrete_function())
    assert any(n.op == "FusedBatchNormV3" for n in freeze_saved_model(str(src)).graph_def.node)
    result = strip_saved_model(str(src), str(dst))
    assert [(r["channels_before"], r["channels_after"]) for r in result.layers] == [(8, 5), (5, 5)]
    assert result.params_after < result.params_before
    frozen = freeze_saved_model(str(dst))
    (norm,) = [n for n in frozen.graph_def.node if n.op == "FusedBatchNormV3"]
    assert [int(d.size) for d in frozen.graph_def.node if d.name == norm.input[1].split(":")[0]
            for d in d.attr["value"].tensor.tensor_shape.dim] == [5]
    x = rng.uniform(0, 1, (2, 10, 10, 3)).astype("float32")
    assert rel_error(_run(dst, x), net(tf.constant(x))) < 1e-4


@pytest.mark.parametrize("shape", ["cat+up", "up+cat", "nested", "cat+cat"])
def test_convolution_added_to_a_concatenation_strips_part_by_part(tmp_path, rng, shape):
    """The SavedModel graph splits a convolution added to a ConcatV2 the way the Keras graph does: 25 % of each
    Keras group zeroed, the same channels go from each part of ``up`` / ``up2``."""
    import tfcompress

    model, _ = split_model(rng, shape)
    for g in tfcompress.channel_groups(model):
        tfcompress.zero_channels(model, g, rng.choice(g.size, max(1, g.size // 4), replace=False))
    result, dst = _strip(model, tmp_path)
    x = rng.uniform(-1, 1, (3, 10, 10, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4
    assert result.params_after < result.params_before
    width = 10 if shape == "cat+cat" else 12
    assert _by_layer(result, "up2")[0]["channels_after"] == width - 3  # one channel of each of 3 groups
    if shape != "cat+cat":
        assert _by_layer(result, "up")[0]["channels_after"] == 9


@pytest.mark.parametrize("build, after", [
    ("sliced_model", {"a": 12, "b": 6, "c": 6}),
    ("spatial_gate_model", {"b0": 8, "b": 12, "c": 5}),
    ("where_model", {"a": 9, "b": 8, "c": 5}),
])
def test_channel_ranges_and_broadcast_gates_strip_like_keras(tmp_path, rng, build, after):
    """``split`` and ``x[..., a:b]`` / ``x[:, -1]`` exported as Split, SplitV and StridedSlice (ellipsis and
    shrink masks), one-channel maps broadcast over the channels (Mul, AddV2), comparisons and ``where``
    (Greater, NotEqual, SelectV2 with a scalar operand): the SavedModel stripper
    removes the channels the Keras stripper removes, exactly."""
    import tfcompress
    import test_keras_ops_models

    model = getattr(test_keras_ops_models, build)()
    for g in tfcompress.channel_groups(model):
        tfcompress.zero_channels(model, g, rng.choice(g.size, max(1, g.size // 4), replace=False))
    result, dst = _strip(model, tmp_path)
    x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4
    stripped = tfcompress.strip(model)
    assert {n: _by_layer(result, n)[0]["channels_after"] for n in after} == {
        n: stripped.get_layer(n).filters for n in after} == after


def test_grouped_convolution_compiled_by_keras_strips_block_by_block(tmp_path, rng):
    """Conv2D(groups=4) (an XLA function call in the SavedModel): one zeroed channel per block of its input and of
    its output goes; the blocks stay equal."""
    inp = keras.Input((10, 10, 3))
    expand, grouped = L.Conv2D(16, 1, name="expand"), L.Conv2D(16, 3, groups=4, padding="same", name="grouped")
    x = L.ReLU()(grouped(L.ReLU()(expand(inp))))
    model = keras.Model(inp, L.Conv2D(4, 1, name="project")(x))
    for layer, zeroed in ((expand, [0, 4, 8, 13]), (grouped, [1, 5, 10, 14])):
        kernel, bias = layer.get_weights()
        kernel[..., zeroed] = 0.0
        bias = rng.uniform(-0.5, 0.5, 16).astype("float32")
        bias[zeroed] = 0.0
        layer.set_weights([kernel, bias])
    result, dst = _strip(model, tmp_path)
    assert [_by_layer(result, n)[0]["channels_after"] for n in ("expand", "grouped", "project")] == [12, 12, 4]
    x = rng.uniform(0, 1, (2, 10, 10, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4


_WITHOUT_ONEDNN = """
import sys
import numpy as np, keras, tensorflow as tf
from tfcompress.stripping.savedmodel_strip import freeze_saved_model, run_frozen, strip_saved_model
L, out = keras.layers, sys.argv[1]
keras.utils.set_random_seed(0)
i2, i1 = keras.Input((10, 10, 3), name="image"), keras.Input((12, 8), name="series")
conv2d = keras.Model(i2, L.Conv2D(4, 1)(L.ReLU()(L.Conv2D(16, 3, groups=4, padding="same")(L.ReLU()(
    L.Conv2D(16, 1)(i2))))))
conv1d = keras.Model(i1, L.GlobalAveragePooling1D()(L.Conv1D(16, 3, groups=2, padding="same")(i1)))
for k, (model, x) in enumerate([(conv2d, np.random.rand(2, 10, 10, 3)), (conv1d, np.random.rand(2, 12, 8))]):
    for layer in model.layers:  # a zeroed output channel in every group of every convolution
        if layer.weights:
            kernel, bias = layer.get_weights()
            kernel[..., ::4] = 0.0
            bias = np.random.uniform(-0.5, 0.5, bias.shape).astype("float32")
            bias[::4] = 0.0
            layer.set_weights([kernel, bias])
    src, dst, x = f"{out}/src{k}", f"{out}/dst{k}", x.astype("float32")
    model.export(src, verbose=False)
    ref = np.asarray(model(x))
    frozen = freeze_saved_model(src)
    (name,) = frozen.inputs
    strip_saved_model(src, dst)
    loaded = tf.saved_model.load(dst).signatures["serving_default"]
    for outputs in (run_frozen(frozen, frozen.graph_def, {name: x}), loaded(**{name: tf.constant(x)})):
        (got,) = outputs.values()
        print(float(np.abs(np.asarray(got) - ref).max()))
"""


def test_grouped_convolutions_run_where_tensorflow_has_no_onednn(tmp_path):
    """Grouped convolutions (Conv2D and Conv1D, ``groups>1``) freeze, strip and serve where TensorFlow runs
    without its oneDNN kernels (its default on CPUs without AVX-512, and ``TF_ENABLE_ONEDNN_OPTS=0``): Keras
    compiles them with XLA, freezing inlines that call, and grappler then fused each with its BiasAdd into an op
    those kernels cannot run ("Fused conv implementation does not support grouped convolutions"). The frozen
    graph and the stripped SavedModel, loaded as users load it, must both match Keras."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_ONEDNN, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [float(v) for v in proc.stdout.split()]
    assert len(errors) == 4 and max(errors) < 1e-4, errors


class _HandWrittenNorm(tf.Module):
    """conv1 (4 of 16 filters zeroed) -> a channel normalization written with TF ops -> conv2 (1x1), where the
    statistics are computed as ``kind`` says (gamma and beta zero on the zeroed channels)."""

    def __init__(self, rng, kind):
        super().__init__()
        self.kind = kind
        w1 = rng.normal(0, 0.3, (3, 3, 3, 16)).astype("float32")
        b1 = rng.uniform(-0.5, 0.5, 16).astype("float32")
        gamma, beta = rng.uniform(0.5, 1.5, 16).astype("float32"), rng.uniform(-0.5, 0.5, 16).astype("float32")
        cut = rng.choice(16, 4, replace=False)
        w1[..., cut] = b1[cut] = gamma[cut] = beta[cut] = 0.0
        self.w1, self.b1 = tf.Variable(w1), tf.Variable(b1)
        self.gamma, self.beta = tf.Variable(gamma), tf.Variable(beta)
        self.w2 = tf.Variable(rng.normal(0, 0.3, (1, 1, 16, 4)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32, name="image")])
    def __call__(self, image):
        with tf.name_scope("conv1"):
            x = tf.nn.bias_add(tf.nn.conv2d(image, self.w1, 1, "SAME"), self.b1)
        m = tf.reduce_mean(x, axis=-1, keepdims=True)
        if self.kind == "moments":
            v = tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(m)), axis=-1, keepdims=True)
        elif self.kind == "reversed":
            v = tf.reduce_mean(tf.square(m - x), axis=[3], keepdims=True)
        elif self.kind == "identity_mean_input":  # the mean reads a copy of x, the difference x itself
            m = tf.reduce_mean(tf.identity(x), axis=-1, keepdims=True)
            v = tf.reduce_mean(tf.math.squared_difference(x, m), axis=-1, keepdims=True)
        elif self.kind == "identity_difference":  # copies between x and Sub, Sub and Square, Square and Mean
            v = tf.reduce_mean(tf.identity(tf.square(tf.identity(tf.identity(x) - m))), axis=-1, keepdims=True)
        elif self.kind == "sum":
            v = tf.reduce_sum(tf.math.squared_difference(x, m), axis=-1, keepdims=True) / 16.0
        else:  # "no_keepdims"
            v = tf.expand_dims(tf.reduce_mean(tf.math.squared_difference(x, m), axis=-1), -1)
        y = (x - m) * tf.math.rsqrt(v + 1e-3) * self.gamma + self.beta
        with tf.name_scope("conv2"):
            return {"out": tf.nn.conv2d(y, self.w2, 1, "VALID")}


@pytest.mark.parametrize("kind,kept", [("moments", 12), ("reversed", 12), ("identity_mean_input", 12),
                                       ("identity_difference", 12), ("sum", 16), ("no_keepdims", 16)])
def test_hand_written_channel_statistics_strip_exactly(tmp_path, rng, kind, kept):
    """A variance the stripper recognises (either operand order, axes as -1 or 3, Identity copies on either
    side) loses the zeroed channels; one it does not (a Sum, a Mean that drops the axis) keeps them. Both stay
    exact (relative max error 1e-4)."""
    module = _HandWrittenNorm(rng, kind)
    tf.saved_model.save(module, str(tmp_path / "src"), signatures=module.__call__)
    if kind.startswith("identity"):  # the copies survive freezing: the stripper sees them
        frozen = freeze_saved_model(str(tmp_path / "src"))
        copied = {n.input[0].split("/")[-1] for n in frozen.graph_def.node if n.op == "Identity"}
        assert {"BiasAdd"} | ({"sub", "Square"} if kind == "identity_difference" else set()) <= copied
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert _by_layer(result, "conv1")[0]["channels_after"] == kept
    x = rng.uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    assert rel_error(_run(tmp_path / "dst", x), module(tf.constant(x))["out"]) < 1e-4


def test_inlined_function_bodies_get_names_no_other_node_has():
    """A body node named ``<call>/<node>`` would repeat a node the graph already has (TF then refuses the
    graph); the inliner moves the body under another prefix and the graph computes what it did."""
    from tfcompress.graph.frozen_graph import inline_function_calls

    @tf.function
    def double(a):
        return a * 2.0

    fdef = double.get_concrete_function(tf.TensorSpec([2], tf.float32)).function_def
    f32 = tf.float32.as_datatype_enum
    g = tf.compat.v1.GraphDef()
    g.library.function.add().CopyFrom(fdef)
    g.node.add(name="inp", op="Placeholder").attr["dtype"].type = f32
    call = g.node.add(name="call", op="PartitionedCall", input=["inp"])
    call.attr["f"].func.name = fdef.signature.name
    call.attr["Tin"].list.type.append(f32)
    call.attr["Tout"].list.type.append(f32)
    clash = f"call/{fdef.node_def[0].name}"
    c = g.node.add(name=clash, op="Const")
    c.attr["dtype"].type = f32
    c.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.array([10.0, 20.0], np.float32)))
    g.node.add(name="out", op="AddV2", input=["call", clash]).attr["T"].type = f32

    inlined = inline_function_calls(g)
    names = [n.name for n in inlined.node]
    assert len(names) == len(set(names))
    assert not any(n.op == "PartitionedCall" for n in inlined.node)
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(inlined, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        out = sess.run("out:0", {"inp:0": np.array([1.0, 3.0], np.float32)})
    np.testing.assert_allclose(out, [12.0, 26.0])


def test_inlined_body_keeps_the_control_dependencies_of_its_call():
    """A call that waits for an assignment (a control input) runs a body that reads the variable without any data
    dependence on the call's argument: inlined, every body node still waits for the assignment, and the graph
    reads the assigned value as the call did."""
    from tfcompress.graph.frozen_graph import inline_function_calls, node_name

    @tf.function(autograph=False)
    def add_variable(a):
        handle = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="tfcompress_test_v")
        return a + tf.raw_ops.ReadVariableOp(resource=handle, dtype=tf.float32)

    graph = tf.Graph()
    with graph.as_default():
        inp = tf.compat.v1.placeholder(tf.float32, [2], name="inp")
        handle = tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="tfcompress_test_v")
        assign = tf.raw_ops.AssignVariableOp(resource=handle, value=tf.constant(5.0), name="assign")
        with tf.control_dependencies([assign]):
            tf.identity(add_variable(inp), name="out")
    original = graph.as_graph_def()
    (call,) = [n for n in original.node if n.op == "StatefulPartitionedCall"]
    assert "^assign" in call.input

    inlined = inline_function_calls(original)
    nodes = {n.name: n for n in inlined.node}

    def ancestors(name):
        seen, stack = set(), [name]
        while stack:
            for i in nodes[stack.pop()].input:
                if node_name(i) not in seen:
                    seen.add(node_name(i))
                    stack.append(node_name(i))
        return seen

    body = [n for n in nodes if n.startswith(call.name + "/")]
    assert any(nodes[n].op == "ReadVariableOp" for n in body)
    assert all("assign" in ancestors(n) for n in body), [n for n in body if "assign" not in ancestors(n)]

    x = np.array([1.0, 3.0], np.float32)
    for graph_def in (original, inlined):
        g = tf.Graph()
        with g.as_default():
            tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            np.testing.assert_array_equal(sess.run("out:0", {"inp:0": x}), [6.0, 8.0])


def test_volumetric_convolutions_pooling_and_transposed_convolution_strip(tmp_path, rng):
    """Conv3D, MaxPooling3D / AveragePooling3D and Conv3DTranspose (volumes, video) are read like their 2-D
    forms: their zeroed channels go and their MACs count, as in the Keras stripper."""
    z = _Zeroer()
    inp = keras.Input((4, 8, 8, 2))
    x = z(inp, L.Conv3D(8, 3, padding="same", name="c1"))
    x = L.MaxPooling3D((1, 2, 2))(x)
    x = z(x, L.Conv3D(8, 3, padding="same", name="c2"), bn=False)
    x = L.AveragePooling3D((2, 1, 1))(x)
    x = z(x, L.Conv3DTranspose(8, 2, strides=2, name="up"), bn=False)
    x = L.Conv3D(4, 1, name="head")(x)
    model = keras.Model(inp, x)
    z.zero(rng)
    result, dst = _strip(model, tmp_path)
    assert {name: _by_layer(result, name)[0]["channels_after"] for name in ("c1", "c2", "up", "head")} == {
        "c1": 6, "c2": 6, "up": 6, "head": 4}
    x = rng.uniform(0, 1, (2, 4, 8, 8, 2)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4
    macs = sum(int(np.prod(layer.kernel.shape)) * int(np.prod(
        (layer.input if isinstance(layer, L.Conv3DTranspose) else layer.output).shape[1:4]))
        for layer in model.layers if isinstance(layer, (L.Conv3D, L.Conv3DTranspose)))
    assert result.flops_before == pytest.approx(2 * macs, rel=1e-6)
    assert result.flops_after < 0.8 * result.flops_before


def test_a_string_input_is_refused_by_name(tmp_path):
    """A signature that takes text (a TextVectorization inside the model) has no numeric input to check,
    convert or calibrate with: the error names the input and says what to export instead."""

    class Text(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="sentence")])
        def __call__(self, s):
            return {"length": tf.cast(tf.strings.length(s), tf.float32)}

    module = Text()
    tf.saved_model.save(module, str(tmp_path / "src"), signatures={"serving_default": module.__call__})
    with pytest.raises(ExportError, match=r"input 'sentence' is a string tensor.*token ids"):
        strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_flattened_feature_map_read_by_dense_strips_like_keras(tmp_path, rng, flatten):
    """``Flatten`` (or ``Reshape((-1,))``) before a Dense is a Reshape of ``[N, H, W, C]`` to ``[N, H*W*C]``:
    channel c sits at every C-th row of the Dense kernel. The convolution before it loses its zeroed channels
    (and a constant one, folded into the Dense bias), as the Keras stripper removes them."""
    import tfcompress

    z = _Zeroer()
    inp = keras.Input((8, 8, 3))
    x = z(inp, L.Conv2D(8, 3, name="c1"))
    x = z(x, L.Conv2D(8, 3, name="c2"))
    x = L.Flatten()(x) if flatten == "Flatten" else L.Reshape((-1,))(x)
    model = keras.Model(inp, L.Dense(3, name="head")(L.Dense(10, activation="relu", name="fc")(x)))
    z.zero(rng)
    norm = z.blocks[1][1]
    gamma, beta, mean, var = norm.get_weights()
    beta[np.flatnonzero(gamma == 0)[0]] = 0.3  # relu(0.3): a constant channel, folded into fc's bias
    norm.set_weights([gamma, beta, mean, var])
    result, dst = _strip(model, tmp_path)
    stripped = tfcompress.strip(model)
    assert [_by_layer(result, n)[0]["channels_after"] for n in ("c1", "c2")] == [
        stripped.get_layer(n).filters for n in ("c1", "c2")] == [6, 6]
    assert result.flops_after == tfcompress.count_flops(stripped) < result.flops_before
    x = rng.uniform(0, 1, (3, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-4


def test_flattening_reshapes_written_by_hand_strip(tmp_path, rng):
    """TF code flattens with a constant target (``[-1, H*W*C]``) or with the batch size read at run time and
    ``-1`` for the rest (tf.keras 2's Flatten); both are the same flattening."""

    class Net(tf.Module):
        def __init__(self, dynamic):
            super().__init__()
            k = rng.normal(0, 0.3, (3, 3, 3, 8)).astype("float32")
            k[..., [2, 5]] = 0.0
            self.k = tf.constant(k)
            self.w = tf.constant(rng.normal(0, 0.3, (6 * 6 * 8, 4)).astype("float32"))
            self.dynamic = dynamic

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            y = tf.nn.relu(tf.nn.conv2d(x, self.k, 1, "VALID"))
            y = tf.reshape(y, [tf.shape(y)[0], -1] if self.dynamic else [-1, 6 * 6 * 8])
            return tf.matmul(y, self.w)

    for dynamic in (False, True):
        net = Net(dynamic)
        src, dst = tmp_path / f"src{dynamic}", tmp_path / f"dst{dynamic}"
        tf.saved_model.save(net, str(src), signatures=net.__call__.get_concrete_function())
        result = strip_saved_model(str(src), str(dst))
        assert [(r["channels_before"], r["channels_after"]) for r in result.layers] == [(8, 6), (4, 4)], dynamic
        x = rng.uniform(0, 1, (2, 8, 8, 3)).astype("float32")
        assert rel_error(_run(dst, x), net(tf.constant(x))) < 1e-5


# removed per group of 4 (groups=4): 3, 1, 0 and 2 channels; with groups=1, 2 or 16 the same channels
_GN_CUT = [0, 1, 2, 5, 12, 14]


def _group_norm_model(rng, groups=4, conv="2d", scale=True, center=True, residual=False, spatial=(8, 8)):
    """stem conv (16 filters) -> GroupNormalization -> head conv, or, with ``residual``, a block whose inner conv
    (1x1) is added to the stem before a second GroupNormalization. The ``_GN_CUT`` channels are zeroed through
    their whole group: filters, biases, the normalizations' gamma and beta, the inner conv's filters."""
    Conv = L.Conv2D if conv == "2d" else L.Conv1D
    inp = keras.Input(spatial[: 2 if conv == "2d" else 1] + (3,))
    stem, inner = Conv(16, 3, padding="same", name="stem"), Conv(16, 1, name="inner")
    norms = [L.GroupNormalization(groups=groups, scale=scale, center=center, name=f"norm{k}") for k in range(2)]
    s = stem(inp)
    x = norms[0](s)
    if residual:
        x = norms[1](s + inner(L.ReLU()(x)))
    model = keras.Model(inp, Conv(4, 1, name="head")(x))
    for layer in (stem, inner) if residual else (stem,):
        kernel = rng.normal(0, 0.3, layer.kernel.shape).astype("float32")
        bias = rng.uniform(-0.5, 0.5, 16).astype("float32")
        kernel[..., _GN_CUT] = bias[_GN_CUT] = 0.0
        layer.set_weights([kernel, bias])
    for norm in norms[: 1 + residual]:
        weights = [rng.uniform(0.5, 1.5, 16).astype("float32") for _ in norm.weights]
        for w in weights:
            w[_GN_CUT] = 0.0
        norm.set_weights(weights)
    return model


def _assert_strips_like_keras(model, result, dst, x, layers):
    """Same outputs as the Keras model (rel. max error 1e-5), the same channels per layer as ``tfcompress.strip``
    and as many parameters removed (the frozen graph counts each normalization's epsilon, Keras does not)."""
    import tfcompress

    stripped = tfcompress.strip(model)
    assert rel_error(_run(dst, x), model(x)) < 1e-5
    assert rel_error(stripped(x), model(x)) < 1e-5
    assert {n: _by_layer(result, n)[0]["channels_after"] for n in layers} == {
        n: stripped.get_layer(n).filters for n in layers}
    assert result.params_before - result.params_after == model.count_params() - stripped.count_params()


@pytest.mark.parametrize("kw, stem_after", [
    (dict(groups=4), 10),  # groups lose 3, 1, 0 and 2 of their 4 channels
    (dict(groups=16), 10),  # one channel per group: a group loses its only channel
    (dict(groups=1), 10),
    (dict(groups=2, center=False), 10),
    (dict(groups=4, conv="1d"), 10),
    (dict(groups=4, spatial=(None, None)), 10),  # the reshapes' targets read the spatial sizes at run time
    (dict(groups=4, residual=True), 10),
    (dict(groups=4, scale=False), 16),  # (0 - mean) / std + beta varies: blocked, as by the Keras stripper
], ids=["groups4", "groups_c", "groups1", "no_center", "conv1d", "dynamic_spatial", "residual", "no_scale"])
def test_group_normalization_strips_like_keras(tmp_path, rng, kw, stem_after):
    """GroupNormalization as Keras traces it (reshape into groups, moments, normalize, reshape back) is one op
    to the SavedModel stripper: the zeroed channels go and each group's statistics still count them, so the
    stripped SavedModel computes what the Keras model does, with the channels and parameters of
    ``tfcompress.strip``."""
    model = _group_norm_model(rng, **kw)
    result, dst = _strip(model, tmp_path)
    assert _by_layer(result, "stem")[0]["channels_after"] == stem_after
    x = rng.uniform(0, 1, (3, 8, 3) if kw.get("conv") == "1d" else (3, 8, 8, 3)).astype("float32")
    _assert_strips_like_keras(model, result, dst, x, ["stem", "head"] + ["inner"] * bool(kw.get("residual")))


def test_group_normalization_counts_removed_constant_channels(tmp_path, rng):
    """Channels 1 and 6 of the stem are constants (zero filters, biases 0.7 and -1.3) whose normalized outputs
    are constants too (gamma 0, beta not), absorbed by the 1x1 head: they go, and their groups' statistics
    still count their values."""
    model = _group_norm_model(rng, groups=4)
    stem, norm = model.get_layer("stem"), model.get_layer("norm0")
    kernel, bias = stem.get_weights()
    kernel[..., [1, 6]], bias[[1, 6]] = 0.0, [0.7, -1.3]
    stem.set_weights([kernel, bias])
    gamma, beta = norm.get_weights()
    gamma[[1, 6]], beta[[1, 6]] = 0.0, [0.4, -0.2]
    norm.set_weights([gamma, beta])
    result, dst = _strip(model, tmp_path)
    assert _by_layer(result, "stem")[0]["channels_after"] == 16 - len(set(_GN_CUT) | {1, 6})
    x = rng.uniform(0, 1, (3, 8, 8, 3)).astype("float32")
    assert rel_error(_run(dst, x), model(x)) < 1e-5


def test_group_normalization_model_exports_stripped(tmp_path, rng):
    """``python -m tfcompress.export``'s pipeline: the rewritten normalization converts to ONNX and OpenVINO."""
    from tfcompress.export import export_saved_model

    model = _group_norm_model(rng, groups=4, residual=True)
    model.export(str(tmp_path / "src"), verbose=False)
    report = export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"), int8="none", verbose=False)
    assert [row["channels_after"] for row in report["layers"]] == [10, 10, 4]
    assert report["steps"]["strip"]["max_rel_error"] < 1e-5
    assert report["steps"]["openvino"]["max_rel_error"] < 1e-5


class _GroupNormByHand(tf.Module):
    """conv (4 of 8 filters zeroed) -> a group normalization in a form Keras does not trace (statistics per
    group of a reshaped tensor, gamma and beta applied after the reshape back) -> conv."""

    def __init__(self, rng):
        super().__init__()
        w1 = rng.normal(0, 0.3, (3, 3, 3, 8)).astype("float32")
        gamma = rng.uniform(0.5, 1.5, 8).astype("float32")
        w1[..., [0, 1, 4, 6]] = gamma[[0, 1, 4, 6]] = 0.0
        self.w1, self.gamma = tf.constant(w1), tf.constant(gamma)
        self.w2 = tf.constant(rng.normal(0, 0.3, (1, 1, 8, 4)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32)])
    def __call__(self, x):
        y = tf.nn.conv2d(x, self.w1, 1, "SAME")
        r = tf.reshape(y, (-1, 8, 8, 2, 4))
        mean, var = tf.nn.moments(r, axes=[1, 2, 4], keepdims=True)
        y = tf.reshape((r - mean) * tf.math.rsqrt(var + 1e-3), (-1, 8, 8, 8)) * self.gamma
        return tf.nn.conv2d(y, self.w2, 1, "VALID")


def test_group_normalization_in_another_form_keeps_blocking(tmp_path, rng):
    module = _GroupNormByHand(rng)
    tf.saved_model.save(module, str(tmp_path / "src"), signatures=module.__call__)
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert [r["channels_after"] for r in result.layers] == [8, 4]
    x = rng.uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    assert rel_error(_run(tmp_path / "dst", x), module(tf.constant(x))) < 1e-5


class _ScalarSwitch(tf.Module):
    """``where(flag, ...)`` on a matmul's output with ``flag`` a scalar boolean input (a switch fed at serving
    time, broadcast over every channel), as ``tf.saved_model.save`` of a ``tf.Module`` writes it."""

    def __init__(self, rng, other):
        super().__init__()
        w1 = rng.normal(size=(6, 8)).astype("float32")
        w1[:, [1, 5]] = 0.0
        self.w1, self.w2, self.other = tf.Variable(w1), tf.Variable(rng.normal(size=(8, 3)).astype("float32")), other

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32, name="x"),
                                  tf.TensorSpec([], tf.bool, name="flag")])
    def __call__(self, x, flag):
        h = tf.nn.relu(tf.matmul(x, self.w1))
        h = tf.where(flag, h * 2.0, h + 1.0 if self.other == "shifted" else h)
        return {"out": tf.matmul(h, self.w2)}


@pytest.mark.parametrize("other,kept", [("same", 6), ("shifted", 8)])
def test_select_on_a_scalar_switch_input_passes_channels(tmp_path, rng, other, kept):
    """A select whose condition is a scalar input carries no channels: a channel zero on both branches is
    removed; one that is 0 on a branch and 1 on the other (which branch runs is known only when called) stays.
    Exact for both values of the switch (relative max error 1e-6)."""
    module = _ScalarSwitch(rng, other)
    tf.saved_model.save(module, str(tmp_path / "src"), signatures=module.__call__)
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert [r["channels_after"] for r in result.layers if r["name"].endswith("/MatMul")] == [kept]
    sig = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"]
    x = rng.normal(size=(4, 6)).astype("float32")
    for flag in (True, False):
        got = sig(x=tf.constant(x), flag=tf.constant(flag))["out"]
        assert rel_error(got, module(tf.constant(x), tf.constant(flag))["out"]) < 1e-6
