"""ONNX models run through ONNX Runtime, wrapped as a forward-only ``nn.Module``.

Many clinical classifiers are delivered as ONNX files. :func:`load_onnx` opens one with
``onnxruntime`` (the optional extra ``medexplain[onnx]``, imported lazily) and returns an
:class:`OnnxNetwork`, which :class:`~medexplain.models.loaded.LoadedModel` wraps like any
other network (labels, activation, input normalisation unchanged).

What an ONNX model can and cannot do here:

- ``forward(x)`` takes ``(B, C, *S)`` on any device and returns float32 outputs on
  ``x.device``; a graph exported with a fixed batch size gets the images in chunks of that
  size (the last chunk padded with copies of its last image, whose outputs are dropped);
- it runs forward only: ONNX Runtime gives no gradients, so explainers that need them are
  refused by :func:`medexplain.explain.create` (the class attribute ``forward_only`` says so);
- its fingerprint (:mod:`.fingerprint`) is a digest of the graph's initializers (its
  weights), held in the buffer ``weights_sha256``, so two ONNX files with different weights
  fingerprint differently;
- the graph's first input and first output are used; a static input shape ``(C, *S)`` is
  read from the graph (:attr:`OnnxNetwork.input_shape`) when the model config states none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import typed_line
from .model_config import ModelError

__all__ = ["OnnxNetwork", "is_onnx", "load_onnx"]

#: numpy dtypes of the ONNX input element types medexplain feeds (images are float32).
_INPUT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}
#: Protobuf tags of ModelProto fields 2-8 (field << 3 | wire type).
_MODEL_PROTO_TAGS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)


def is_onnx(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model: the ``.onnx`` suffix, or a protobuf that starts
    like a ``ModelProto``: field 1 (``ir_version``, a small varint), then one of its fields
    2-8 (producer, version, domain, doc string, graph, opset), as every exporter writes."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as handle:
        head = handle.read(4096)
    return len(head) > 2 and head[0] == 0x08 and head[2] in _MODEL_PROTO_TAGS


def _onnxruntime(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            f"{path} is an ONNX model: install the onnx extra to run it "
            "(pip install 'medexplain[onnx]', which brings onnxruntime)"
        ) from None
    return onnxruntime


def _static(dims: list[Any]) -> tuple[int, ...] | None:
    """``dims`` as ints, or None when any is symbolic (a name) or unknown."""
    if any(not isinstance(d, int) or d < 1 for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _weights_digest(path: Path) -> bytes:
    """SHA-256 over the sorted digests of the graph's initializers (name-independent), or of
    the file's bytes when the ``onnx`` package is not installed."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return hashlib.sha256(path.read_bytes()).digest()
    try:
        proto = onnx.load(str(path))
    except Exception as error:
        raise ModelError(f"cannot read ONNX model {path}: {typed_line(error)}") from error
    digests = []
    for tensor in proto.graph.initializer:
        array = np.ascontiguousarray(numpy_helper.to_array(tensor))
        h = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).digest()


class OnnxNetwork(nn.Module):
    """An ONNX Runtime session as a forward-only network: ``(B, C, *S)`` -> ``(B, K)``.

    Attributes:
        path: the ONNX file.
        input_shape: ``(C, *S)`` when the graph's input is static, else None.
        batch: the graph's fixed batch size, or None when it is dynamic.
        forward_only: always True (ONNX Runtime gives no gradients).
    """

    forward_only = True

    def __init__(self, path: Path, session: Any, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self._sessions: dict[str, Any] = {"CPUExecutionProvider": session}
        self._threads = threads
        first = session.get_inputs()[0]
        self.input_name = first.name
        self.output_name = session.get_outputs()[0].name
        if first.type not in _INPUT_DTYPES:
            raise ModelError(
                f"{path}: the ONNX model's input {first.name!r} is {first.type}; medexplain "
                f"feeds images as {', '.join(_INPUT_DTYPES)}"
            )
        self._dtype = _INPUT_DTYPES[first.type]
        dims = list(first.shape)
        if len(dims) not in (4, 5):
            raise ModelError(
                f"{path}: the ONNX model's input {first.name!r} has shape {dims}; medexplain "
                "needs images (B, C, H, W) or (B, C, D, H, W)"
            )
        self.batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        self._dims = dims[1:]
        self.input_shape = _static(dims[1:])
        self.register_buffer(
            "weights_sha256", torch.tensor(list(_weights_digest(self.path)), dtype=torch.uint8)
        )

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles hold the file, not the sessions (which cannot be copied); the
        copy opens its own session on first use."""
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state

    @property
    def forward_only_name(self) -> str:
        """How errors name this model when refusing a gradient method."""
        return f"the ONNX model {self.path.name}"

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, input_shape={self.input_shape}, batch={self.batch}"

    def _session(self, device: torch.device) -> Any:
        """The CPU session, or a CUDA one for CUDA tensors when ONNX Runtime has CUDA."""
        provider = "CPUExecutionProvider"
        if device.type == "cuda":
            ort = _onnxruntime(self.path)
            if "CUDAExecutionProvider" in ort.get_available_providers():
                provider = "CUDAExecutionProvider"
        if provider not in self._sessions:  # also the CPU session of a copy
            providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
            self._sessions[provider] = _open_session(self.path, providers, self._threads)
        return self._sessions[provider]

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled() and x.requires_grad:
            raise ModelError(
                f"{self.path} is an ONNX model, which runs forward only: it gives no gradients "
                "(needed by gradient methods and to fit learned explainers); use a forward-only "
                "method (occlusion, rise, sag)"
            )
        wrong = x.dim() - 1 != len(self._dims) or any(
            isinstance(d, int) and d > 0 and d != n for d, n in zip(self._dims, x.shape[1:])
        )
        if wrong:
            wanted = ", ".join(str(d) if isinstance(d, int) else "?" for d in self._dims)
            raise ModelError(
                f"the ONNX model {self.path.name} takes inputs (B, {wanted}), got "
                f"{tuple(x.shape)}; resample the images to its size (--shape)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        session = self._session(x.device)
        images = x.detach().to("cpu").numpy().astype(self._dtype, copy=False)
        step = self.batch or len(images)
        outputs = []
        for start in range(0, len(images), max(1, step)):
            part = images[start : start + step]
            if self.batch is not None and len(part) < self.batch:
                pad = np.repeat(part[-1:], self.batch - len(part), axis=0)
                part = np.concatenate([part, pad])
            try:
                out = session.run([self.output_name], {self.input_name: part})[0]
            except Exception as error:
                raise ModelError(
                    f"the ONNX model {self.path.name} failed on inputs of shape "
                    f"{tuple(part.shape)}: {typed_line(error)}"
                ) from error
            outputs.append(np.asarray(out)[: min(step, len(images) - start)])
        result = np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
        return torch.from_numpy(np.ascontiguousarray(result, dtype=np.float32)).to(x.device)


def _open_session(path: Path, providers: list[str], threads: int | None) -> Any:
    ort = _onnxruntime(path)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only: no warnings on stderr for every session
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:
        raise ModelError(
            f"cannot read ONNX model {path}: {typed_line(error)} (expected an .onnx file "
            "written by torch.onnx.export or another ONNX exporter)"
        ) from error


def load_onnx(path: Path, threads: int | None = None) -> OnnxNetwork:
    """The ONNX model in ``path`` as an :class:`OnnxNetwork` (CPU session; ``threads`` intra-op
    threads, default torch's thread count). ModelError when onnxruntime is missing or the
    file is not a usable ONNX model."""
    threads = torch.get_num_threads() if threads is None else threads
    session = _open_session(path, ["CPUExecutionProvider"], threads)
    return OnnxNetwork(path, session, threads)
