"""Triton kernels that enforce a frozen domain relation (imported as ``domainguard.kernels``)."""
