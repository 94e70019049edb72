"""Plain-PyTorch twins of every fused_lm op, written for clarity (float32/float64).

Tests compare every kernel against these and the benchmarks run them as the eager baseline.
Nothing here imports from fused_lm: only torch.
"""
