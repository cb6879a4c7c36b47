"""``medlora serve``: one base network, adapters loaded on demand, concurrent requests for different adapters
segmented in one mixed-adapter batch, behind LitServe (:mod:`medlora.serving.server`; see ``docs/serving.md``).

The core (:class:`Service`) does not import the serving engine, so it is usable and testable without it.
"""

from .service import MODES, Lockstep, Segmentation, ServeError, ServeRequest, Service

__all__ = ["MODES", "Lockstep", "Segmentation", "ServeError", "ServeRequest", "Service"]
