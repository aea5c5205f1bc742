"""eureka_jax: GRPO-family reinforcement learning for Qwen2.5-VL in JAX (the MM-Eureka recipe)."""

__version__ = "0.1.0"
