"""kennel serving: the SageMaker inference contract on sagemaker-inference + MMS, ONNX Runtime on CPU.

The request path, top to bottom, is request_path.py: decode (inputs.py, url_fetch.py)
-> preprocess (kennel_artifact.Preprocessing.apply) -> forward (engine.py) -> render
(outputs.py). settings.py and cpus.py read the environment. Everything that exists
because of multi-model-server or sagemaker-inference is in mms_toolkit/.
"""
