"""Graph rewrites. One pass per file; each docstring lists the cases it rewrites. Local rewrites are
rules (kiln/passes/rewrite.py) that one driver applies to a fixpoint."""
from __future__ import annotations

from kiln.passes.base import Pass, PassManager, PassResult, RewriteError
from kiln.passes.rewrite import Rule, RulePass, rewrite


def default_passes() -> list[Pass]:
    """The passes every build runs, in order (repeated until nothing changes)."""
    from kiln.passes.bn_fold import FoldBatchNorm
    from kiln.passes.constant_fold import ConstantFold
    from kiln.passes.dead_layers import RemoveDeadLayers
    from kiln.passes.fold_shapes import FoldShapeValues
    from kiln.passes.identity import RemoveIdentities
    from kiln.passes.onehot_gather import OneHotGather
    return [ConstantFold(), FoldShapeValues(), RemoveIdentities(), FoldBatchNorm(), OneHotGather(), RemoveDeadLayers()]


def fusion_passes(device: str | None = None) -> list[Pass]:
    """Rewrites that merge layers; run after the cleanup passes have settled. With ``device``, only the passes
    whose merged layers have a kernel there that pays (``Pass.devices``): a fusion made for a GPU kernel would
    leave a CPU engine a merged layer that runs its parts one by one, without their fused epilogues."""
    from kiln.passes.collapse_views import CollapseViews
    from kiln.passes.cse import EliminateCommonSubexpressions
    from kiln.passes.fuse_add_norm import FuseAddNorm
    from kiln.passes.fuse_attention import FuseAttention
    from kiln.passes.fuse_conv_chain import FuseConvChains
    from kiln.passes.fuse_epilogue import FuseEpilogues
    from kiln.passes.fuse_parallel_linear import FuseParallelLinear
    from kiln.passes.fuse_patterns import FusePatterns
    from kiln.passes.fuse_pointwise import FusePointwise
    from kiln.passes.fuse_projection import FuseProjectionShortcuts
    from kiln.passes.fuse_shuffles import FuseShuffles
    from kiln.passes.fuse_stem_pool import FuseStemPool
    from kiln.passes.shape_constants import FoldShapeConstants
    from kiln.passes.sink_shuffles import SinkShuffles
    passes = [EliminateCommonSubexpressions(), FoldShapeConstants(), FusePatterns(), FuseAttention(), FuseEpilogues(),
              FuseStemPool(), FuseShuffles(), SinkShuffles(), CollapseViews(), FuseAddNorm(), FusePointwise(),
              FuseParallelLinear(), FuseProjectionShortcuts(), FuseConvChains()]
    return [p for p in passes if device is None or p.devices is None or device in p.devices]


def quantization_passes() -> list[Pass]:
    """Explicit quantization folded into 8-bit layers, then parallel 8-bit GEMMs over one input merged; run after
    the fusion passes, in CUDA builds only (their 8-bit kernels are GPU kernels). RecordQuantizedConstants
    (passes/fold_qdq.py) must run before the default passes."""
    from kiln.passes.fold_qdq import FoldQDQ
    from kiln.passes.fuse_parallel_qlinear import FuseParallelQLinear
    return [FoldQDQ(), FuseParallelQLinear()]


__all__ = ["Pass", "PassManager", "PassResult", "RewriteError", "Rule", "RulePass", "default_passes", "fusion_passes",
           "quantization_passes", "rewrite"]
