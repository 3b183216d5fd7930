"""RNN, GRU, LSTM (ONNX layouts, all directions)."""
from __future__ import annotations

from kiln.onnx.registry import converter


def _rnn(cell, n_out):
    def fn(ctx, node):
        ins = list(node.inputs) + [None] * (8 - len(node.inputs))
        if cell != "lstm":
            ins = ins[:6]
        attrs = {"cell": cell, "hidden_size": node.attr("hidden_size"), "direction": node.attr("direction", "forward"),
                 "activations": node.attr("activations"), "activation_alpha": node.attr("activation_alpha"),
                 "activation_beta": node.attr("activation_beta"), "clip": node.attr("clip"),
                 "linear_before_reset": node.attr("linear_before_reset", 0), "layout": node.attr("layout", 0),
                 "input_forget": node.attr("input_forget", 0)}
        x = node.input(0)
        return ctx.add("RNN", ins, attrs, num_outputs=n_out, output_dtypes=[x.dtype] * n_out).outputs
    return fn


converter("RNN", since=1)(_rnn("rnn", 2))
converter("GRU", since=1)(_rnn("gru", 2))
converter("LSTM", since=1)(_rnn("lstm", 3))
