"""The default inference handlers: model_fn, input_fn, predict_fn, output_fn (+ warm-up).

sagemaker-inference calls them in this order for each request; a user's
code/inference.py in the model dir may replace any of them (SAGEMAKER_PROGRAM
names the module), exactly as in SageMaker's framework images. Every function
takes the MMS context as an optional last argument, which the toolkit passes.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import numpy as np
from PIL import Image
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler

from kennel_artifact import Preprocessing

from kennel_serve import inputs, outputs
from kennel_serve.activity import busy_workers
from kennel_serve.engine import KennelModel
from kennel_serve.settings import ServeSettings
from kennel_serve.url_fetch import UrlFetcher

log = logging.getLogger(__name__)


def request_headers(context: Any) -> dict:
    """The current request's headers from the MMS context ({} outside MMS)."""
    try:
        return context.request_processor[0].get_request_properties() or {}
    except (AttributeError, IndexError, TypeError):
        return {}


class KennelInferenceHandler(DefaultInferenceHandler):
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
                                 others_busy=lambda: busy_workers(state_dir) > 1)
        self.preprocessing = model.manifest.preprocessing
        return model

    def default_model_warmup_fn(self, model_dir: str, model: Any, context: Any = None) -> None:
        if isinstance(model, KennelModel):
            model.warm_up()
        else:
            log.info("model_fn returned a %s, not a kennel model: no built-in warm-up", type(model).__name__)

    def default_input_fn(self, input_data: Any, content_type: str,
                         context: Any = None) -> np.ndarray | list[Image.Image]:
        """The model's inputs, float32 [N, 3, H, W] (decoded RGB images when model_fn is the user's)."""
        # One deadline for every URL of the request, from its start.
        fetch = functools.partial(self.fetcher.fetch, deadline=self.fetcher.request_deadline())
        decoded = inputs.decode_request(input_data, content_type, fetch_url=fetch,
                                        max_images=self.settings.max_images, max_pixels=self.settings.max_pixels,
                                        max_request_pixels=self.settings.max_request_pixels,
                                        preprocessing=self.preprocessing)
        return np.stack(decoded) if self.preprocessing is not None else decoded

    def default_predict_fn(self, data: Sequence[Image.Image] | np.ndarray, model: Any,
                           context: Any = None) -> outputs.Prediction:
        """Images (or an already preprocessed float32 [N, 3, H, W] array) -> logits, in one forward pass."""
        if not isinstance(model, KennelModel):
            raise TypeError(f"the default predict_fn needs the model of the default model_fn, got a "
                            f"{type(model).__name__}: define predict_fn in code/inference.py too")
        logits = model.forward(data) if isinstance(data, np.ndarray) else model.predict(data)
        return outputs.Prediction(logits=logits, class_names=model.class_names)

    def default_output_fn(self, prediction: Any, accept: str, context: Any = None) -> tuple[str, str]:
        if not isinstance(prediction, outputs.Prediction):
            raise TypeError(f"the default output_fn needs the Prediction of the default predict_fn, got a "
                            f"{type(prediction).__name__}: define output_fn in code/inference.py too")
        media_type = outputs.negotiate(accept, default=outputs.JSON)
        attributes = outputs.custom_attributes(request_headers(context))
        return outputs.render(prediction, media_type, attributes, self.settings.top_k)
