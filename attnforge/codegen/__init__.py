"""Codegen: IR -> passes -> block analysis -> gradients -> Triton source. Imports only dsl."""
