"""A worker's models on a multi-model endpoint, with one backbone per identity.

On a multi-model endpoint MMS runs one model, this host; the routes of
SageMaker's contract (mms_toolkit/multi_model_routes.py) hand each load and each
invoke to a worker as a job (mms_toolkit/multi_model_transformer.py). Every worker
holds the models it has served:

- a model trained with a frozen backbone (its manifest's ``backbone`` record) runs
  as backbone.onnx then head.onnx, and every model whose record names the same
  identity uses the one backbone session: the Nth such model costs a head graph
  (about a megabyte) and milliseconds to load;
- any other model (a fine-tuned backbone, or made before the split) loads whole,
  exactly as a single-model endpoint loads it (engine.KennelModel).

A load that the memory left cannot hold is refused with 507 (SageMaker then unloads
models it has not used lately and tries again). Unloads come from the list of loaded
models the endpoint keeps in the state dir (models.json): a thread drops what left it,
so memory comes back while the worker is idle too.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

import kennel_artifact
from kennel_artifact import ArtifactError, Manifest

from kennel_serve import engine, precision
from kennel_serve.mms_toolkit.activity import busy_workers
from kennel_serve.settings import MIB, ServeSettings

log = logging.getLogger(__name__)

REGISTRY_FILE = "models.json"  # written by mms_toolkit/multi_model_routes.py
WATCH_INTERVAL_S = 0.2
# What a load must leave free in the container, for requests in flight.
MEMORY_RESERVE = 128 * MIB
# Resident memory of a loaded graph per byte of its file: weights, ONNX Runtime's
# prepacked copies and arena (measured on ResNet-18/50, docs/benchmarks.md).
RESIDENT_PER_FILE_BYTE = 2.0
# How long a load waits for the other workers to drop unloaded models before a 507.
MEMORY_WAIT_S = 1.0
SHARED_PRECISION = precision.Choice("fp32", "fp32", "a shared backbone runs its FP32 graph")


class InsufficientMemory(Exception):
    """The model does not fit in the memory left: SageMaker's 507."""


def head_options() -> ort.SessionOptions:
    """A head is one or two small matrix products: one thread, no arena kept between runs."""
    options = engine.session_options(1)
    options.enable_cpu_mem_arena = False
    return options


class Backbone:
    """backbone.onnx of one identity, shared by every model that names it (in this worker)."""

    def __init__(self, identity: str, path: Path, threads: int, solo_threads: int,
                 others_busy: Callable[[], bool]):
        self.identity = identity
        self.session = engine.open_session(path, engine.session_options(threads))
        self.solo_session = (engine.open_session(path, engine.session_options(solo_threads))
                             if solo_threads > threads else None)
        self.others_busy = others_busy
        self.input_shape = self.session.get_inputs()[0].shape
        self.warm = False

    def features(self, batch: np.ndarray) -> np.ndarray:
        session = self.solo_session if self.solo_session is not None and not self.others_busy() else self.session
        return engine.run_batched(lambda part: self._run(session, part), batch)

    @staticmethod
    def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        (features,) = session.run([kennel_artifact.FEATURES],
                                  {kennel_artifact.ONNX_INPUT: np.ascontiguousarray(batch, dtype=np.float32)})
        return features

    def warm_up(self, height: int, width: int) -> np.ndarray:
        """The first run of each session (buffers, kernel choices), out of the first request's way."""
        batch = precision.synthetic_batch(height, width)
        features = self._run(self.session, batch)
        if self.solo_session is not None:
            self._run(self.solo_session, batch)
        if not np.all(np.isfinite(features)):
            raise ArtifactError("the backbone gave features that are not finite numbers (NaN or infinity)")
        self.warm = True
        return features


class SharedBackboneModel:
    """A model as a resident backbone plus its own head: the interface of engine.KennelModel."""

    def __init__(self, manifest: Manifest, backbone: Backbone, head_path: Path):
        self.manifest = manifest
        self.backbone = backbone
        self.head = engine.open_session(head_path, head_options())
        self.precision = SHARED_PRECISION
        self._check_signature(head_path)

    def _check_signature(self, head_path: Path) -> None:
        inputs = [i.name for i in self.head.get_inputs()]
        outputs = {o.name: o.shape for o in self.head.get_outputs()}
        if inputs != [kennel_artifact.FEATURES] or kennel_artifact.ONNX_OUTPUT not in outputs:
            raise ArtifactError(f"{head_path} must map {kennel_artifact.FEATURES!r} to "
                                f"{kennel_artifact.ONNX_OUTPUT!r}, maps {inputs} -> {sorted(outputs)}")
        classes = outputs[kennel_artifact.ONNX_OUTPUT][-1]
        if isinstance(classes, int) and classes != self.manifest.num_classes:
            raise ArtifactError(f"{head_path} gives {classes} scores per image, but {kennel_artifact.MANIFEST_FILE} "
                                f"names {self.manifest.num_classes} classes")
        height, width = self.manifest.preprocessing.input_size
        shape = self.backbone.input_shape
        if any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, height, width))):
            raise ArtifactError(f"the backbone expects input of shape {shape}, but the manifest's preprocessing "
                                f"gives [N, 3, {height}, {width}]")

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def forward(self, batch: np.ndarray) -> np.ndarray:
        features = self.backbone.features(batch)
        (logits,) = self.head.run([kennel_artifact.ONNX_OUTPUT], {kennel_artifact.FEATURES: features})
        return logits

    def warm_up(self) -> None:
        """The backbone's first model warms it up; the next ones run only their head (the backbone is warm)."""
        if not self.backbone.warm:
            features = self.backbone.warm_up(*self.manifest.preprocessing.input_size)
        else:
            features = np.zeros((1, self.manifest.backbone["features"]), dtype=np.float32)
        (logits,) = self.head.run([kennel_artifact.ONNX_OUTPUT], {kennel_artifact.FEATURES: features})
        if logits.shape != (1, self.manifest.num_classes) or not np.all(np.isfinite(logits)):
            raise ArtifactError(f"warm-up inference gave scores of shape {list(logits.shape)} (expected "
                                f"[1, {self.manifest.num_classes}]) or scores that are not finite")


@dataclass
class Loaded:
    token: str  # the endpoint's load of this name: a reload under the same name is another model
    model: SharedBackboneModel | engine.KennelModel


class MultiModelHost:
    """The models one worker holds, by the names the endpoint loaded them under."""

    def __init__(self, settings: ServeSettings, watch: bool = True):
        self.settings = settings
        self.models: dict[str, Loaded] = {}
        self.backbones: dict[str, Backbone] = {}
        self._lock = threading.RLock()
        self._registry_seen: tuple[int, int] | None = None
        if watch:
            threading.Thread(target=self._watch, name="kennel-mme-registry", daemon=True).start()

    # ------------------------------------------------------------------ loading

    def get(self, name: str, url: str, token: str) -> SharedBackboneModel | engine.KennelModel:
        """The model loaded as (name, token), loading it here first if this worker has not yet."""
        with self._lock:
            loaded = self.models.get(name)
            if loaded is not None and loaded.token == token:
                return loaded.model
        return self.load(name, url, token, for_every_worker=False)

    def load(self, name: str, url: str, token: str,
             for_every_worker: bool = True) -> SharedBackboneModel | engine.KennelModel:
        """Load (or reload) ``name`` from ``url``; ArtifactError, InsufficientMemory or OSError say why not.

        ``for_every_worker``: the endpoint's load, which must leave room for every worker's copy;
        a worker loading at its first request needs room for its own copy only (the load made room).
        """
        model_dir = Path(url)
        started = time.perf_counter()
        with self._lock:
            self.sync()
            self._unload(name)
            manifest = kennel_artifact.read_manifest(model_dir)
            if (model_dir / "code").exists():
                raise ArtifactError(f"{model_dir} brings code/ (its own inference handlers): a multi-model endpoint "
                                    f"serves kennel models with the built-in handlers; serve it on an endpoint of "
                                    f"its own")
            resident = manifest.backbone is not None and manifest.backbone["sha256"] in self.backbones
            self._check_memory(name, model_dir, manifest, resident,
                               self.settings.workers if for_every_worker else 1)
            if manifest.shares_backbone:
                model = self._load_shared(model_dir, resident)
            else:
                model = engine.KennelModel.load(model_dir, threads=self.settings.ort_threads,
                                                solo_threads=self.settings.solo_threads,
                                                others_busy=self._others_busy,
                                                precision_setting=self.settings.precision,
                                                state_dir=self.settings.state_dir)
            try:
                model.warm_up()
            except BaseException:
                self._release(model)
                raise
            self.models[name] = Loaded(token, model)
        how = ("head only, backbone resident" if resident else
               "backbone and head" if isinstance(model, SharedBackboneModel) else "whole model")
        log.warning("worker %d loaded model %s from %s (%s) in %.0f ms", os.getpid(), name, url, how,
                    (time.perf_counter() - started) * 1000)
        return model

    def _load_shared(self, model_dir: Path, resident: bool) -> SharedBackboneModel:
        manifest = kennel_artifact.load_split(model_dir, verify_backbone=not resident)
        identity = manifest.backbone["sha256"]
        backbone = self.backbones.get(identity)
        if backbone is None:
            backbone = Backbone(identity, model_dir / kennel_artifact.BACKBONE_FILE, self.settings.ort_threads,
                                self.settings.solo_threads, self._others_busy)
            self.backbones[identity] = backbone
        try:
            return SharedBackboneModel(manifest, backbone, model_dir / kennel_artifact.HEAD_FILE)
        except BaseException:
            self._drop_if_unused(backbone)
            raise

    def _others_busy(self) -> bool:
        return busy_workers(self.settings.state_dir) > 1

    # ------------------------------------------------------------------ memory

    def _check_memory(self, name: str, model_dir: Path, manifest: Manifest, resident: bool, copies_of: int) -> None:
        """Refuse a load the container's memory cannot hold, once ``copies_of`` workers have loaded it."""
        if manifest.shares_backbone:
            files = [kennel_artifact.HEAD_FILE] + ([] if resident else [kennel_artifact.BACKBONE_FILE])
        else:
            files = [kennel_artifact.ONNX_FILE]
        per_worker = sum((model_dir / f).stat().st_size for f in files if (model_dir / f).exists())
        copies = 2 if self.settings.solo_threads > self.settings.ort_threads and not resident else 1
        need = int(per_worker * RESIDENT_PER_FILE_BYTE * copies * copies_of) + MEMORY_RESERVE
        deadline = time.monotonic() + MEMORY_WAIT_S
        while True:
            free = available_memory()
            if free is None or free >= need:
                return
            if time.monotonic() >= deadline:  # other workers may still be dropping unloaded models
                raise InsufficientMemory(f"not enough memory to load model {name}: it needs about {need // MIB} MiB "
                                         f"for {copies_of} worker(s), {free // MIB} MiB are free")
            time.sleep(0.1)

    # ------------------------------------------------------------------ unloading

    def sync(self) -> None:
        """Drop the models the endpoint no longer lists (models.json)."""
        path = self.settings.state_dir / REGISTRY_FILE
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        seen = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if seen == self._registry_seen:
                return
            try:
                listed = json.loads(path.read_text())["models"]
            except (OSError, ValueError, KeyError, TypeError):
                return  # mid-replace cannot happen (renamed into place); try again at the next change
            self._registry_seen = seen
            for name, loaded in list(self.models.items()):
                record = listed.get(name)
                if record is None or str(record.get("token")) != loaded.token:
                    self._unload(name)

    def _unload(self, name: str) -> None:
        loaded = self.models.pop(name, None)
        if loaded is not None:
            self._release(loaded.model)
            log.warning("worker %d unloaded model %s", os.getpid(), name)

    def _release(self, model: SharedBackboneModel | engine.KennelModel) -> None:
        if isinstance(model, SharedBackboneModel):
            self._drop_if_unused(model.backbone)

    def _drop_if_unused(self, backbone: Backbone) -> None:
        """A backbone no loaded model uses any more gives its memory back."""
        if not any(isinstance(other.model, SharedBackboneModel) and other.model.backbone is backbone
                   for other in self.models.values()):
            self.backbones.pop(backbone.identity, None)

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL_S)
            try:
                self.sync()
            except Exception:  # noqa: BLE001 (the watcher must outlive any one bad read)
                log.exception("could not read the list of loaded models")


def available_memory() -> int | None:
    """Bytes the container may still allocate: its cgroup limit less its usage, else the host's."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            host = _host_available()
            free = int(limit) - usage + _reclaimable(Path(limit_file).with_name("memory.stat"))
            return min(free, host) if host is not None else free
        break
    return _host_available()


def _reclaimable(stat_file: Path) -> int:
    """Page cache the kernel drops before it fails an allocation (counted in the cgroup's usage)."""
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _host_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
