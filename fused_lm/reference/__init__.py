"""Plain-PyTorch twins of every fused_lm op, written for clarity (float32/float64).

Tests compare every kernel against these and the benchmarks run them as the eager baseline.
One module per op family, named as the family (``SPEC.name`` in fused_lm/ops): adamw, lion,
multi_tensor_scale, multi_tensor_norm, multi_tensor_clamp, cross_entropy, linear_cross_entropy,
attention; ``rounding`` holds what the optimizer twins share. clip, optim and multi_tensor are
the earlier names, kept as re-exports. Nothing here imports from fused_lm: only torch.
"""
