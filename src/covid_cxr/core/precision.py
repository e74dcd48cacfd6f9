"""Runtimes and precisions a bundle can be served with, and the rule a lower precision must pass
(issue 19): the one home of these defaults. Torch-free.

ONNX Runtime fp32 is the default and the reference. OpenVINO (the `openvino` extra) runs the same
model.onnx; its fp32 answers as ONNX Runtime's do, so it needs no measurement. A lower precision is
a *variant*: it serves only once `covid-cxr bundle precision` has measured it against the bundle's
own fp32 answers on its validation split and recorded it as accepted in metadata.json.
"""

from __future__ import annotations

RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_RUNTIME = "onnxruntime"
# fp32: as written. bf16: every op in bfloat16 (AVX-512 BF16 / AMX). bf16-split: the backbone's
# convolutions in bf16, the head and the out-of-distribution gate (every op after the spatial
# pooling) in fp32. int8: NNCF post-training quantization of the backbone, head and gate left
# unquantized (its IR is stored in the bundle).
PRECISIONS = ("fp32", "bf16", "bf16-split", "int8")
DEFAULT_PRECISION = "fp32"
VARIANTS = PRECISIONS[1:]  # what needs a recorded, accepted measurement before it serves

# The rule: against fp32 on the validation split, at most this share of predicted labels and of
# gate verdicts may change (0.5 %: on a 620-film validation split, 3 films).
MAX_CHANGED_PREDICTIONS = 0.005
MAX_CHANGED_GATE = 0.005

INT8_CALIBRATION_IMAGES = 300  # NNCF's default subset size; drawn from the training split
