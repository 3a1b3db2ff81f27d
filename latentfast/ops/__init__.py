from latentfast.ops.thinking_residual import thinking_residual  # noqa: F401
