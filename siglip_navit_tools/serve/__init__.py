# Copyright 2026 The siglip-navit authors. Licensed under the Apache License, Version 2.0.
"""An image-embedding server that packs the images of concurrent requests into shared forwards (`serve.py`'s library).

    options   ServeOptions (every knob, one comment each)
    batcher   the queue, admission and continuous first-fit packing; the one model thread (pure rules testable alone)
    engine    model + processor loading, a request's images -> patch counts -> packs (handler.py's request format
              and limits), one packed forward, pooling
    protocol  OpenAI's embeddings / error shapes and /v1/features' shapes (pure)
    app       the FastAPI app: endpoints, auth, errors, metrics, the request's steps in order
    run       serve(options): load, warm up, uvicorn; SIGTERM / Ctrl-C drain, then exit 0
    cli       argparse -> ServeOptions -> serve()

Must not decode request images itself (handler.py owns the format and its limits) nor compute any image <-> pack
geometry (the image processor owns it).
"""

from .options import ServeOptions
from .run import serve

__all__ = ["ServeOptions", "serve"]
