"""The request path, top to bottom: decode -> preprocess -> forward -> render.

sagemaker-inference calls these handlers, in this order, for every request:

1. default_input_fn: decode the body into images (inputs.py; {"url": ...} images are
   fetched by url_fetch.py) and preprocess each one as soon as it is decoded, with the
   artifact's Preprocessing.apply, the function training evaluated with;
2. default_predict_fn: one forward pass on ONNX Runtime (engine.py);
3. default_output_fn: render the logits as the client's Accept asks (outputs.py).

Each step is a stage of the request's timings (kennel_serve.metrics): input_fn is
"decode" less the "fetch" of URLs and the "preprocess" of each image, predict_fn
"forward", output_fn "render".

default_model_fn and default_model_warmup_fn run once per worker, before its first
request. A user's code/inference.py in the model dir may replace any of them
(SAGEMAKER_PROGRAM names the module), exactly as in SageMaker's framework images.
Every handler takes the MMS context as an optional last argument, which the toolkit
passes. What wraps this path (MMS, the toolkit and their workarounds) is in
kennel_serve.mms_toolkit: MMS -> handler_service.HandlerService ->
transformer.KennelTransformer (screening, errors, busy flag) -> the toolkit's
Transformer -> the handlers below.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from PIL import Image

from kennel_artifact import Preprocessing

from kennel_serve import inputs, metrics, outputs
from kennel_serve.engine import KennelModel
from kennel_serve.multi_model import SharedBackboneModel
from kennel_serve.mms_toolkit.activity import busy_workers
from kennel_serve.mms_toolkit.transformer import request_headers
from kennel_serve.settings import ServeSettings
from kennel_serve.url_fetch import UrlFetcher

log = logging.getLogger(__name__)


class KennelInferenceHandler:
    """The toolkit's default_inference_handler: the handlers user code does not replace."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.fetcher = UrlFetcher(settings.url)
        # Set by the default model_fn: the default input_fn then preprocesses each image
        # as soon as it is decoded. A model of a user's model_fn gets decoded images.
        self.preprocessing: Preprocessing | None = None

    def default_model_fn(self, model_dir: str, context: Any = None) -> KennelModel:
        state_dir = self.settings.state_dir
        model = KennelModel.load(model_dir, threads=self.settings.ort_threads, solo_threads=self.settings.solo_threads,
                                 # This worker counts itself while it handles the request.
                                 others_busy=lambda: busy_workers(state_dir) > 1,
                                 precision_setting=self.settings.precision, state_dir=state_dir)
        self.preprocessing = model.manifest.preprocessing
        return model

    def default_model_warmup_fn(self, model_dir: str, model: Any, context: Any = None) -> None:
        if isinstance(model, KennelModel):
            model.warm_up()
        else:
            log.info("model_fn returned a %s, not a kennel model: no built-in warm-up", type(model).__name__)

    def default_input_fn(self, input_data: Any, content_type: str,
                         context: Any = None) -> np.ndarray | list[Image.Image]:
        """Decode and preprocess: float32 [N, 3, H, W] (decoded RGB images when model_fn is the user's)."""
        # One deadline for every URL of the request, from its start.
        deadline = self.fetcher.request_deadline()

        def fetch(url: str) -> bytes:
            with metrics.stage("fetch"):
                return self.fetcher.fetch(url, deadline=deadline)

        # Each image is preprocessed as soon as it is decoded, so at most one decoded image is held.
        decoded = inputs.decode_request(input_data, content_type, fetch_url=fetch,
                                        max_images=self.settings.max_images, max_pixels=self.settings.max_pixels,
                                        max_request_pixels=self.settings.max_request_pixels,
                                        preprocessing=self.preprocessing)
        return np.stack(decoded) if self.preprocessing is not None else decoded

    def default_predict_fn(self, data: Sequence[Image.Image] | np.ndarray, model: Any,
                           context: Any = None) -> outputs.Prediction:
        """Forward: model inputs (or decoded images) -> logits, in one forward pass."""
        if not isinstance(model, (KennelModel, SharedBackboneModel)):
            raise TypeError(f"the default predict_fn needs the model of the default model_fn, got a "
                            f"{type(model).__name__}: define predict_fn in code/inference.py too")
        logits = model.forward(data) if isinstance(data, np.ndarray) else model.predict(data)
        return outputs.Prediction(logits=logits, class_names=model.class_names)

    def default_output_fn(self, prediction: Any, accept: str, context: Any = None) -> tuple[str, str]:
        """Render: (body, Content-Type) in the media type the client's Accept prefers."""
        if not isinstance(prediction, outputs.Prediction):
            raise TypeError(f"the default output_fn needs the Prediction of the default predict_fn, got a "
                            f"{type(prediction).__name__}: define output_fn in code/inference.py too")
        media_type = outputs.negotiate(accept, default=outputs.JSON_ANSWER_TYPE)
        attributes = outputs.custom_attributes(request_headers(context))
        return outputs.render(prediction, media_type, attributes, self.settings.top_k)
