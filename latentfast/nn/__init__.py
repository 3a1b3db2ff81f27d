from latentfast.nn.thinking_residual import ThinkingResidual, ThinkingResidualLambda  # noqa: F401
