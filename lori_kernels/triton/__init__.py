"""Triton backend (see issue: CUDA and Triton backends)."""
