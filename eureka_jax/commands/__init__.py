"""Thin entry points for the `eureka-jax` CLI: each module parses its flags and calls the library.

Every module here exposes `main(argv: list[str]) -> int`; logic lives in the library so that a
notebook can call the same functions.
"""
