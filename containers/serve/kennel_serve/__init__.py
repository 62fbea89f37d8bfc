"""kennel serving: the SageMaker inference contract on sagemaker-inference + MMS, ONNX Runtime on CPU."""
