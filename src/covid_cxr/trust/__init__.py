"""Trust: whether an image is inside what the model knows (out-of-distribution gate), calibrated
probabilities (temperature scaling), uncertainty in every figure (bootstrap) and a shortcut audit."""
