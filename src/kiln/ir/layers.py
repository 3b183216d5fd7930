"""The layer vocabulary: every kind a Network may hold, with its input arity and meaning.

TensorRT's classic layers first, then what modern ONNX models need. Attribute
conventions are documented per kind; kernels in ``kiln.kernels`` implement them.
Inputs marked *host* are read as values (shapes, indices) and live on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import NetworkError

VARIADIC = 1 << 30


@dataclass(frozen=True)
class LayerKind:
    name: str
    min_inputs: int
    max_inputs: int
    doc: str
    host_inputs: tuple[int, ...] = ()    # input positions read as host values (shape tensors)


LAYER_KINDS: dict[str, LayerKind] = {}


def define_layer(name: str, min_inputs: int, max_inputs: int, doc: str, host_inputs: tuple[int, ...] = ()) -> None:
    """Add a kind to the vocabulary; defining one twice is an error."""
    if name in LAYER_KINDS:
        raise NetworkError(f"Layer kind {name!r} is defined twice; pick another name.")
    LAYER_KINDS[name] = LayerKind(name, min_inputs, max_inputs, doc, host_inputs)


def check_layer(layer, num_inputs: int) -> None:
    spec = LAYER_KINDS.get(layer.kind)
    if spec is None:
        raise NetworkError(f"Layer {layer.name!r} has unknown kind {layer.kind!r}; known kinds: "
                           f"{', '.join(sorted(LAYER_KINDS))}. Use a Plugin layer for custom operations.")
    if not spec.min_inputs <= num_inputs <= spec.max_inputs:
        hi = "any number of" if spec.max_inputs >= VARIADIC else f"at most {spec.max_inputs}"
        raise NetworkError(f"Layer {layer.name!r} ({layer.kind}) takes at least {spec.min_inputs} and {hi} inputs, "
                           f"got {num_inputs}.")


# ---- TensorRT's classic layers ---------------------------------------------------------------
define_layer("Activation", 1, 1, "y = f(x); attrs type (relu, sigmoid, tanh, leaky_relu, elu, selu, softplus, softsign, "
             "clip, hard_sigmoid, gelu, gelu_tanh, silu, mish, hard_swish, thresholded_relu, celu, scaled_tanh), alpha, beta")
define_layer("Concatenation", 1, VARIADIC, "join along attrs axis")
define_layer("Convolution", 2, 4, "N-d convolution (1/2/3-D): x, weight, bias?, residual?; attrs stride, pads (begins "
             "then ends), dilation, groups; fused epilogue attrs activation/alpha/beta and residual (y = act(conv + r), or act(conv) + r with "
             "residual_after_activation)")
define_layer("Conv1x1Chain", 6, 8, "two 1x1 convolutions back to back: x, W3, b3, residual?, W1, b1, x2?, W2? → y = act(conv(x, W3) + b3 "
             "+ residual + conv(x2, W2, stride2)), z = act2(conv(y, W1) + b1); attrs activation, activation2, stride2 "
             "(passes/fuse_conv_chain.py)")
define_layer("Conv1x1Sum", 5, 5, "two 1x1 convolutions added: x1, W1, x2, W2, b → y = act(conv(x1, W1, stride1) + "
             "conv(x2, W2, stride2) + b); attrs stride1, stride2, activation/alpha/beta (passes/fuse_projection.py)")
define_layer("Deconvolution", 2, 3, "transposed convolution: x, weight [Cin, Cout/g, k...], bias?; attrs stride, pads, "
             "dilation, groups, output_padding")
define_layer("FullyConnected", 2, 3, "y = x @ weight.T + bias over the last axis; weight [N, K]")
define_layer("ElementWise", 1, VARIADIC, "broadcasting binary (or n-ary) op; attrs op (sum, sub, prod, div, max, min, pow, "
             "mod, fmod, floor_div, and, or, xor, equal, greater, less, greater_equal, less_equal, bitshift_left, "
             "bitshift_right, bitwise_and, bitwise_or, bitwise_xor, prelu)")
define_layer("Pooling", 1, 1, "attrs type (max, average, lp), kernel (None = global), stride, pads, dilation, ceil_mode, "
             "count_include_pad, p")
define_layer("Padding", 1, 4, "x, pads?, value?, axes?; attrs pads (begins then ends), mode (constant, reflect, edge, wrap), "
             "value", host_inputs=(1, 3))
define_layer("Flatten", 1, 1, "2-D view: dims before attrs axis, dims after")
define_layer("LRN", 1, 1, "local response normalization across channels; attrs size, alpha, beta, bias")
define_layer("SoftMax", 1, 1, "attrs axis, log (log-softmax); computed in FP32")
define_layer("RNN", 3, 8, "ONNX-style RNN/GRU/LSTM: X, W, R, B?, sequence_lens?, initial_h?, initial_c?, P?; attrs cell "
             "(rnn, gru, lstm), direction, hidden_size, activations, clip, linear_before_reset, layout")
define_layer("Scale", 1, 4, "y = (x * scale + shift) ** power; x, scale?, shift?, power?; attrs mode (uniform, channel, "
             "elementwise), channel_axis")
define_layer("Shuffle", 1, 2, "transpose → reshape → transpose; x, shape?; attrs first_transpose, reshape, "
             "second_transpose, allowzero", host_inputs=(1,))
define_layer("Squeeze", 1, 2, "remove size-1 axes: x, axes?; attrs axes", host_inputs=(1,))
define_layer("Unsqueeze", 1, 2, "insert size-1 axes: x, axes?; attrs axes", host_inputs=(1,))
define_layer("Unary", 1, 1, "y = op(x); attrs op (exp, log, sqrt, recip, abs, neg, sin, cos, tan, sinh, cosh, asin, acos, "
             "atan, asinh, acosh, atanh, ceil, floor, round, erf, not, sign, isnan, isinf, bitwise_not, identity)")
define_layer("Plugin", 0, VARIADIC, "a custom layer; attrs plugin (a kiln.Plugin instance)")
define_layer("Constant", 0, 0, "attrs value; produced by folding or by hand")
define_layer("Identity", 1, 1, "y = x (kept only where a copy is needed)")

# ---- what modern ONNX models need ------------------------------------------------------------
define_layer("MatMul", 2, 2, "batched matrix product with numpy broadcasting; attrs transpose_a, transpose_b")
define_layer("Gemm", 2, 3, "y = alpha * op(A) @ op(B) + beta * C; attrs alpha, beta, trans_a, trans_b")
define_layer("Reduce", 1, 2, "x, axes?; attrs op (sum, mean, max, min, prod, l1, l2, log_sum, log_sum_exp, sum_square), "
             "axes, keepdims, noop_with_empty_axes; accumulates in FP32", host_inputs=(1,))
define_layer("ArgReduce", 1, 1, "index of max/min; attrs op (max, min), axis, keepdims, select_last_index")
define_layer("Gather", 2, 2, "take along attrs axis with an index tensor (negative indices wrap)")
define_layer("GatherElements", 2, 2, "take_along_axis; attrs axis")
define_layer("GatherND", 2, 2, "attrs batch_dims")
define_layer("ScatterND", 3, 3, "data, indices, updates; attrs reduction (none, add, mul, max, min)")
define_layer("ScatterElements", 3, 3, "data, indices, updates; attrs axis, reduction")
define_layer("Slice", 3, 5, "x, starts, ends, axes?, steps?", host_inputs=(1, 2, 3, 4))
define_layer("Resize", 1, 4, "x, roi?, scales?, sizes?; attrs mode, coordinate_transformation_mode, nearest_mode, "
             "cubic_coeff_a, exclude_outside, extrapolation_value, antialias, axes, keep_aspect_ratio_policy",
             host_inputs=(1, 2, 3))
define_layer("Normalization", 1, 6, "x, scale?, bias?, (mean, var for batch), residual?; attrs type (layer, instance, "
             "group, batch, rms), axis, epsilon, num_groups; statistics in FP32. With a residual (layer/rms only) the "
             "layer normalizes x + residual; attrs sum_output adds a second output, the sum itself")
define_layer("Cast", 1, 1, "attrs to (dtype name), saturate")
define_layer("Shape", 1, 1, "the input's shape as int64 (host); attrs start, end")
define_layer("Size", 1, 1, "element count as int64 scalar (host)")
define_layer("TopK", 2, 2, "x, k; attrs axis, largest, sorted; outputs values, indices", host_inputs=(1,))
define_layer("If", 1, 1, "cond; attrs then_branch, else_branch (Networks); a constant cond is folded at build")
define_layer("Loop", 2, VARIADIC, "ONNX Loop: max_trip_count?, cond?, carried...; attrs body (Network)")
define_layer("Scan", 1, VARIADIC, "ONNX Scan; attrs body, num_scan_inputs, directions and axes")
define_layer("Where", 3, 3, "select: cond ? a : b with broadcasting")
define_layer("Expand", 2, 2, "broadcast x to shape (host)", host_inputs=(1,))
define_layer("Tile", 2, 2, "repeat x by repeats (host)", host_inputs=(1,))
define_layer("ConstantOfShape", 1, 1, "filled tensor of the shape (host); attrs value (array of one element)",
             host_inputs=(0,))
define_layer("Range", 3, 3, "start, limit, delta", host_inputs=(0, 1, 2))
define_layer("Split", 1, 2, "x, split?; attrs axis, split (sizes) or equal parts over the outputs", host_inputs=(1,))
define_layer("Einsum", 1, VARIADIC, "attrs equation")
define_layer("CumSum", 2, 2, "x, axis; attrs exclusive, reverse", host_inputs=(1,))
define_layer("NonZero", 1, 1, "indices of non-zero elements, [rank, n] int64 (data-dependent shape)")
define_layer("OneHot", 3, 3, "indices, depth, values; attrs axis", host_inputs=(1,))
define_layer("Trilu", 1, 2, "x, k?; attrs upper", host_inputs=(1,))
define_layer("DepthToSpace", 1, 1, "attrs blocksize, mode (DCR, CRD)")
define_layer("SpaceToDepth", 1, 1, "attrs blocksize")
define_layer("Attention", 3, 4, "fused scaled-dot-product attention: q, k, v, mask?; attrs scale, causal")

# ---- sequences and optionals (values are Python lists of tensors / None at run time) ---------
define_layer("SequenceEmpty", 0, 0, "an empty sequence; attrs dtype (element type)")
define_layer("SequenceConstruct", 1, VARIADIC, "a sequence of the inputs, in order")
define_layer("SequenceAt", 2, 2, "seq, position (negative counts from the end) → that element", host_inputs=(1,))
define_layer("SequenceInsert", 2, 3, "seq, tensor, position? → a new sequence with tensor inserted (default: at the end)",
             host_inputs=(2,))
define_layer("SequenceErase", 1, 2, "seq, position? → a new sequence without that element (default: the last)",
             host_inputs=(1,))
define_layer("SequenceLength", 1, 1, "number of elements as an int64 scalar")
define_layer("SplitToSequence", 1, 2, "x, split? → sequence of chunks along attrs axis; attrs keepdims (for split-by-1)",
             host_inputs=(1,))
define_layer("ConcatFromSequence", 1, 1, "join a sequence's tensors along attrs axis; attrs new_axis (stack instead)")
define_layer("SequenceMap", 1, VARIADIC, "run attrs body (Network) once per element of the first input (a sequence); "
             "further sequence inputs are walked in step, tensor inputs are passed whole; outputs are sequences")
define_layer("Optional", 0, 1, "wrap a tensor or sequence as an optional; no input → an empty optional (None)")
define_layer("OptionalHasElement", 0, 1, "bool scalar: the optional (or tensor/sequence) input is present")
define_layer("OptionalGetElement", 1, 1, "the value inside an optional (a tensor or a sequence)")

# ---- quantization (TensorRT's IQuantizeLayer / IDequantizeLayer) ------------------------------
define_layer("QuantizeLinear", 2, 3, "y = saturate(round(x / scale) + zero_point); x, scale, zero_point?; attrs axis, "
             "block_size (0 = per-tensor or per-axis), to (output dtype), saturate")
define_layer("DequantizeLinear", 2, 3, "y = (x - zero_point) * scale; x, scale, zero_point?; attrs axis, block_size, "
             "to (output dtype)")
define_layer("DynamicQuantizeLinear", 1, 1, "uint8 quantization with scale/zero point from the data's range; "
             "outputs y, scale, zero_point")

# ---- signal processing ------------------------------------------------------------------------
define_layer("DFT", 1, 3, "x [..., n, 1 or 2], dft_length?, axis? → complex as a trailing 2; attrs axis, inverse, onesided",
             host_inputs=(1, 2))
define_layer("STFT", 2, 4, "signal, frame_step, window?, frame_length?; attrs onesided", host_inputs=(1, 3))
define_layer("Window", 1, 1, "size (host) → window; attrs type (hann, hamming, blackman), periodic, to (dtype)",
             host_inputs=(0,))
define_layer("MelWeightMatrix", 5, 5, "num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz (host); "
             "attrs to (dtype)", host_inputs=(0, 1, 2, 3, 4))

# ---- normalization with statistics outputs, unpooling -------------------------------------
define_layer("LayerNormStats", 1, 3, "layer normalization that also returns Mean and InvStdDev: x, scale?, bias? → "
             "y, mean, inv_std_dev; attrs axis, epsilon, stash_type (float32 statistics when 1)")
define_layer("BatchNormTraining", 5, 5, "batch normalization with batch statistics: x, scale, bias, running_mean, "
             "running_var → y, new running_mean, new running_var; attrs epsilon, momentum")
define_layer("MaxUnpool", 2, 3, "x, indices, output_shape? → scatter x to the indices; attrs kernel, stride, pads",
             host_inputs=(2,))

# ---- ONNX conformance additions (issue 3, helper A) --------------------------------------------
define_layer("MultiHeadAttention", 3, 7, "ONNX Attention (opset 23+): q, k, v, mask?, past_key?, past_value?, "
             "nonpad_kv_seqlen?; outputs y, present_key, present_value, qk_matmul_output; attrs scale, is_causal, "
             "q_num_heads, kv_num_heads, softcap, qk_matmul_output_mode, left/right_window_size")
define_layer("RotaryEmbedding", 3, 4, "x, cos_cache, sin_cache, position_ids?; attrs interleaved, num_heads, "
             "rotary_embedding_dim")
define_layer("NLLLoss", 2, 3, "negative log-likelihood: log-probs [N, C, ...], target [N, ...], weight? [C]; attrs "
             "reduction (none, sum, mean), ignore_index")
define_layer("Unique", 1, 1, "unique values (or slices along attrs axis); outputs y, first indices, inverse indices, "
             "counts; attrs axis, sorted (else order of first occurrence); data-dependent shape")
define_layer("Compress", 2, 2, "x, condition (1-D bool) → the slices along attrs axis (flattened when None) where it holds")
define_layer("ReverseSequence", 2, 2, "x, sequence_lens → each batch's first lens[b] steps reversed; attrs batch_axis, "
             "time_axis")
define_layer("TensorScatter", 2, 3, "cache, update, write_indices? → cache with update written per batch at the index "
             "along attrs axis; attrs mode (linear, circular)")
define_layer("EyeLike", 1, 1, "a 2-D identity-like tensor shaped like x (output dtype from the layer); attrs k")
define_layer("CenterCropPad", 2, 2, "x, shape (host) → centered crop or zero pad to shape on attrs axes",
             host_inputs=(1,))
define_layer("BitCast", 1, 1, "reinterpret the bits as attrs to (same element size)")
define_layer("Col2Im", 3, 3, "columns [N, C*prod(block), L], image_shape, block_shape (host) → image, summing overlaps; "
             "attrs dilations, pads, strides", host_inputs=(1, 2))
define_layer("Hardmax", 1, 1, "one-hot of the (first) maximum along attrs axis")
define_layer("Det", 1, 1, "determinant of the trailing square matrices")
define_layer("QLinearOp", 8, 9, "quantized matmul/conv with requantization: a, a_scale, a_zero_point, b, b_scale, "
             "b_zero_point, y_scale, y_zero_point, bias? (int32, conv); attrs op (matmul, conv) and for conv stride, "
             "pads, dilation, groups; integer arithmetic, round half to even, saturate")
define_layer("IntegerOp", 2, 4, "integer matmul/conv: a, b, a_zero_point?, b_zero_point? → int32; attrs op (matmul, "
             "conv) and for conv stride, pads, dilation, groups")
define_layer("Select", 1, 1, "x indexed at one constant position along attrs axis (attrs index); a view, no copy")
define_layer("LinearAttention", 3, 6, "ONNX LinearAttention (opset 27): query, key, value, past_state?, decay?, beta?; "
             "outputs output, present_state; attrs update_rule, q_num_heads, kv_num_heads, scale")
define_layer("TfIdfVectorizer", 1, 1, "n-gram counts of integer token rows → float32 [N, columns]; attrs pool_int64s, "
             "ngram_counts, ngram_indexes, min/max_gram_length, max_skip_count, mode (TF, IDF, TFIDF), weights")
define_layer("Pointwise", 1, VARIADIC, "a fused chain of element-wise ops over broadcast inputs; attrs program: "
             "[[op, arg, ...], ...] in SSA order, args 'iN' (input N), 'vN' (step N) or a float constant; "
             "the last step is the output")
