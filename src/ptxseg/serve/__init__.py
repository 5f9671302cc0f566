"""``ptxseg serve``: an HTTP inference service and a browser viewer for one run.

- :mod:`ptxseg.serve.service`: the model loaded once, the limits, upload and queue places,
  the stages of a request;
- :mod:`ptxseg.serve.batcher`: micro-batches of concurrent requests on one worker thread;
- :mod:`ptxseg.serve.upload`: request bodies under a size and a time limit, multipart parsed
  in memory under part limits;
- :mod:`ptxseg.serve.access`: the bearer token, the bind rule, the Host allow-list;
- :mod:`ptxseg.serve.logs`: one escaped line per log record, one access line per request;
- :mod:`ptxseg.serve.app`: the FastAPI routes and middleware, the answer to every failure;
- :mod:`ptxseg.serve.page`: the viewer page and the API reference, self-contained.

It needs the ``serve`` extra (FastAPI, uvicorn, python-multipart): ``pip install
'ptxseg[serve]'``. The command line checks for it first (:func:`missing_extra`).
"""

from __future__ import annotations

import importlib.util

#: the packages of the ``serve`` extra, by import name
EXTRA_MODULES = ("fastapi", "uvicorn", "python_multipart")
EXTRA_HINT = "pip install 'ptxseg[serve]'"


def missing_extra() -> list[str]:
    """The packages of the ``serve`` extra that are not installed."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
