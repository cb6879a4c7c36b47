"""``medlora serve`` on LitServe: HTTP in front of :class:`medlora.serving.Service`.

``POST /predict`` (multipart form): ``file`` = a NIfTI volume (``.nii`` or ``.nii.gz``), ``adapter`` = an adapter
name (omitted or empty: the base). The answer is the label NIfTI (uint8, gzipped, the input's geometry, byte for
byte what ``medlora infer`` writes) with headers ``X-Medlora-Volume-mL``, ``X-Medlora-Voxels``,
``X-Medlora-Adapter``, ``X-Medlora-Cache`` (``hit``, ``miss``, ``base`` or ``merged-now``) and
``X-Medlora-Batch`` (JSON: requests in the batch, the adapters in it, seconds). An error is a JSON
``{"detail": "<one line>"}`` with status 400 (unreadable or non-CT upload, bad form), 404 (unknown adapter),
422 (an adapter for another base or an unusable adapter file) or 500; the server goes on serving.

LitServe's dynamic batching (``max_batch_size``, ``batch_timeout``) collects concurrent requests; one bad
request must not fail its batch, so decoding never raises: a failure travels through ``predict`` as a value and
becomes that request's own error response.
"""

from __future__ import annotations

import json
import os
from typing import Any

import litserve as ls

from ..errors import MedloraError
from ..inference.infer import resolve_device
from .service import Segmentation, ServeError, Service

__all__ = ["SegmentationAPI", "build_server", "encode_answer", "run_server"]


def encode_answer(answer: Segmentation | ServeError) -> Any:
    """The HTTP response of one answer (a Starlette response: LitServe returns it as it is)."""
    from fastapi.responses import JSONResponse, Response

    if isinstance(answer, ServeError):
        return JSONResponse({"detail": str(answer)}, status_code=answer.status)
    headers = {
        "Content-Disposition": f'attachment; filename="{answer.filename}"',
        "X-Medlora-Adapter": answer.adapter or "",
        "X-Medlora-Volume-mL": repr(answer.volume_ml),
        "X-Medlora-Voxels": str(answer.voxels),
        "X-Medlora-Cache": answer.cache,
        "X-Medlora-Batch": json.dumps(answer.batch, separators=(",", ":")),
    }
    return Response(answer.nifti, media_type="application/gzip", headers=headers)


def _form_field(form: Any, key: str) -> Any:
    try:
        return form.get(key)
    except AttributeError:
        return None


class SegmentationAPI(ls.LitAPI):
    """The LitServe API: decoding and encoding here, everything else in :class:`Service` (built in the worker)."""

    def __init__(self, options: dict[str, Any], max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.options = dict(options)

    def setup(self, device: str) -> None:
        self.service = Service(device=device, **self.options)

    # No annotations on these two: LitServe reads the request and response types from them (a multipart form
    # arrives as Starlette's form data when the request is unannotated).
    def decode_request(self, request):
        upload = _form_field(request, "file")
        adapter = _form_field(request, "adapter")
        if adapter is not None and not isinstance(adapter, str):
            return ServeError(400, "the form field 'adapter' must be text (an adapter name)")
        if upload is None or isinstance(upload, str) or not hasattr(upload, "file"):
            return ServeError(400, "no NIfTI upload: send the volume as the multipart file field 'file' "
                                   "(curl -F file=@scan.nii.gz -F adapter=NAME)")
        try:
            upload.file.seek(0)
            return self.service.decode(upload.file.read(), upload.filename, (adapter or "").strip() or None)
        except ServeError as exc:
            return exc

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def predict(self, x: Any) -> Any:
        if isinstance(x, list):  # batched loop (max_batch_size > 1)
            return self.service.segment(x)
        return self.service.segment([x])[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return list(output)

    def encode_response(self, output):
        return encode_answer(output)


def build_server(model: str | os.PathLike[str], adapters: str | os.PathLike[str], *, max_batch_size: int = 8,
                 batch_timeout: float = 0.05, cache_size: int = 8, device: str = "cpu", sw_batch_size: int = 2,
                 overlap: float = 0.25, mode: str = "mixed", request_timeout: float = 600.0) -> ls.LitServer:
    """A ``litserve.LitServer`` for the service (not started). Options are checked here, in the calling process,
    by building the service once: a bad ``--model`` or ``--adapters`` is one line before any worker starts."""
    if max_batch_size < 1:
        raise MedloraError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if batch_timeout < 0:
        raise MedloraError(f"--batch-timeout must be at least 0, got {batch_timeout}")
    if request_timeout <= batch_timeout:
        raise MedloraError(f"--request-timeout {request_timeout} must be longer than --batch-timeout {batch_timeout}")
    options = {"model": os.fspath(model), "adapters": os.fspath(adapters), "cache_size": cache_size,
               "sw_batch_size": sw_batch_size, "overlap": overlap, "mode": mode}
    resolve_device(device)
    Service(device="cpu", **options)  # the checks only; the worker builds its own on its device
    accelerator = {"cpu": "cpu", "auto": "auto"}.get(device, "cuda")
    api = SegmentationAPI(options, max_batch_size, batch_timeout)
    return ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=request_timeout,
                        model_metadata={"model": options["model"], "adapters": options["adapters"], "mode": mode})


def run_server(model: str | os.PathLike[str], adapters: str | os.PathLike[str], *, host: str = "127.0.0.1",
               port: int = 8000, **options: Any) -> int:
    """Build and run the server until interrupted; see :func:`build_server` for the options."""
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise MedloraError(f"--host {host}: LitServe binds 127.0.0.1 (this machine only), 0.0.0.0 or ::")
    if not 1024 <= port <= 65535:
        raise MedloraError(f"--port {port}: must be in 1024..65535")
    server = build_server(model, adapters, **options)
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1)
    return 0
