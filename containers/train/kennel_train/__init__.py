"""kennel_train: the training image's program (the SageMaker training contract).

Entry points:
    kennel_train.main:main        SAGEMAKER_TRAINING_MODULE: the toolkit's `train` calls it in-process
    python -m kennel_train        the same program without the toolkit (flags; compose, tests)
    python -m kennel_train.convert   an original system model.pth / model.tar.gz -> a model directory
    python -m kennel_train.sample    the bundled sample dataset

Read top to bottom: contract (paths, settings, channels) -> data (classes, files,
transforms, loaders) -> model (network, frozen/trainable split) -> loop (one
pass) -> checkpoint / stop (resume, SIGTERM) -> export (model directory) ->
reports (output/data, TensorBoard); main ties them together, failure turns
errors into the one-line reason, device picks CPU/GPU and precision,
distributed runs several hosts as one job.
"""
import os

# ONNX Runtime (the frozen backbone on CPU, the export check) reports usage to an
# outside collector unless this is set before it is imported: a training job talks
# to S3 and its peers, nobody else. Set here, before any module imports it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
