"""Everything that exists because kennel serves on multi-model-server (MMS) 1.1.11 through
sagemaker-inference (the toolkit) 1.10.1, and works around what they get wrong.

Each module's docstring names the defects it works around and the tests that prove it:

- launcher.py: the `serve` command (stale MMS pid file, requirements.txt into a
  read-only venv, InService with a model that cannot load);
- mms_config.py: MMS's configuration and environment instead of the toolkit's (timeout
  read as minutes, management API on the client port, JVM heap from the host's memory,
  bare 413s, the /ping and /execution-parameters plugin, preload);
- supervisor.py: MMS in its own process group, stopped whole; a failed worker load ends
  serve instead of endless retries;
- drain.py: requests in flight finish on SIGTERM, /ping says 503 meanwhile;
- activity.py: the workers' busy flags, failure line and draining marker (files);
- handler_service.py: the handler module MMS loads (one class; fork hooks for preload;
  a failed initialize ends the worker instead of being swallowed);
- transformer.py: the toolkit's Transformer without tracebacks in bodies, with media
  type parameters, charsets, header spellings and the payload limit handled;
- errors.py: the toolkit's error type, which a 4xx must have.

mms-plugin/ (Java) is the MMS side: /ping that waits for a loaded model and drains,
/execution-parameters. kennel's own request path is kennel_serve.request_path.
"""
