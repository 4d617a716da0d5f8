"""Attention-block kernels: one key block of softmax attention with its log-sum-exp."""
