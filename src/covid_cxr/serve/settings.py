"""Server settings: one typed object, built by the CLI (or a test) and handed to `create_app`."""

from __future__ import annotations

import os
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field

from covid_cxr.core.precision import DEFAULT_PRECISION, DEFAULT_RUNTIME, PRECISIONS, RUNTIMES
from covid_cxr.data.decode import DEFAULT_MAX_PIXELS

MB = 1024 * 1024


class ServeSettings(BaseModel):
    """Everything the app factory needs; no module-level state is read anywhere else."""

    models: Path = Field(description="model repository (MODELS, holding <name>/<version>/ folders)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8501, description="TCP port (TF Serving's REST default)")
    api_key: str | None = Field(None, description="bearer token clients must send (None: every route open)")
    # Liveness, readiness (incl. TF Serving's per-model status and v2 model ready, which probes use),
    # the web page and /static never need the key; what else does is chosen here.
    api_key_scope: Literal["all", "predict"] = Field("all", description="with an API key, which routes need it: "
                                                     "'all' (predict/infer, model lists, metadata with test metrics, "
                                                     "Triton config) or 'predict' (only what runs a model)")
    public_metrics: bool = Field(False, description="serve /metrics without the API key (a Prometheus on a "
                                 "private network that scrapes without credentials)")
    max_body_bytes: int = Field(20 * MB, ge=1, description="request body limit (413 beyond it)")
    max_concurrency: int = Field(64, ge=1, description="predict requests being handled (counted once their body "
                                 "has arrived, so clients still sending cannot lock others out); beyond it 503 at once")
    # 30 s: a 20 MB body at 6 Mbit/s; an X-ray file of a few MB takes seconds even on a slow link.
    body_timeout_s: float = Field(30.0, gt=0, description="seconds a client may take to send its request body; "
                                  "beyond it 408 and the connection is closed")
    # 10 s: a request's headers are a few hundred bytes; even a slow phone link sends them in well under a second.
    header_timeout_s: float = Field(10.0, gt=0, description="seconds a client may take to send a request's headers "
                                    "(from connecting, or from the previous response); beyond it the connection "
                                    "is closed")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="largest image accepted, in pixels "
                                  "(the default takes 4,300 x 4,300 radiographs)")
    # Two largest images at once (one per core on this machine): with reduced decoding each costs
    # at most ~4 bytes per pixel, so decoding holds ~160 MB at worst whatever the load.
    decode_budget_pixels: int = Field(2 * DEFAULT_MAX_PIXELS, ge=1, description="pixels being decoded at once "
                                      "across all requests; further decodes wait")
    batching: bool = Field(True, description="group concurrent requests into one ONNX Runtime call")
    # 4: on this 2-core CPU, ONNX Runtime's CPU time per image is flat up to 4 images per call and
    # grows beyond (+15% at 8, +40% at 32: cache), as does its memory arena; a GPU would want more.
    max_batch: int = Field(4, ge=1, description="most images in one ONNX Runtime call (larger requests are split)")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a batch waits for requests still being decoded")
    max_instances: int = Field(64, ge=1, description="most instances in one TF Serving request")
    rescan_seconds: float = Field(2.0, gt=0, description="how often the model repository is re-read")
    keep_old_seconds: float = Field(60.0, ge=0, description="an explicitly requested older version stays "
                                    "loaded this long after its last use")
    intra_op_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1,
                                  description="ONNX Runtime threads per call")
    inference_workers: int = Field(1, ge=1, description="batches run at the same time (one per worker)")
    ort_spinning: bool = Field(False, description="let ONNX Runtime's idle threads spin (busy-wait)")
    runtime: Literal[RUNTIMES] = Field(DEFAULT_RUNTIME, description="what runs model.onnx: onnxruntime | "
                                       "openvino (the `openvino` extra)")
    precision: Literal[PRECISIONS] = Field(DEFAULT_PRECISION, description="fp32 | bf16 | bf16-split | int8 "
                                           "(OpenVINO); a lower one serves only where `covid-cxr bundle precision` "
                                           "measured and accepted it for that bundle")
    lungs: Path | None = Field(None, description="lung segmentation bundle (MODELS/lungs): the upload API adds "
                               "the lung check and where Grad-CAM looks by lung zone")
    # 200: at that size the window's tests see a real-source site within its first 10-20 films
    # (docs/results/site.md) and one odd film moves nothing; memory: 200 rows of 5 floats per model.
    monitor_window: int = Field(200, ge=0, description="site monitor: latest answers per model version tested "
                                "against the bundle's reference (0: no monitor)")
    default_model: str | None = Field(None, description="upload API's model when none is named "
                                      "(default: the only one, or the first by name)")

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0
