"""Triton kernels of erpo, installed as `erpo.kernels` (never as the bare name `kernels`).

Importing this package does not import triton; each kernel module does, when it is first used.
"""
