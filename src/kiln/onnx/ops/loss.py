"""Loss ops: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (opset 12+)."""
from __future__ import annotations

from kiln.onnx.registry import converter


def _nll_attrs(node) -> dict:
    return {"reduction": node.attr("reduction", "mean"), "ignore_index": node.attr("ignore_index")}


@converter("NegativeLogLikelihoodLoss", since=12)
def nll_loss(ctx, node):
    x = node.input(0)
    ins = [x, node.input(1)] + ([node.input(2)] if node.input(2) is not None else [])
    return ctx.add1("NLLLoss", ins, _nll_attrs(node), dtype=x.dtype)


@converter("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy(ctx, node):
    """log-softmax over the class axis (1), then NLL; the optional second output is the log-probs."""
    x = node.input(0)
    log_prob = ctx.add1("SoftMax", [x], {"axis": 1, "log": True}, dtype=x.dtype)
    ins = [log_prob, node.input(1)] + ([node.input(2)] if node.input(2) is not None else [])
    loss = ctx.add1("NLLLoss", ins, _nll_attrs(node), dtype=x.dtype)
    return [loss, log_prob] if node.num_outputs > 1 else [loss]
