"""A bound Serve application for `serve build rankformer.serve.bound:app` (which needs an
application object, not a builder): the model comes from ``RANKFORMER_MODEL`` (default
``models:/rankformer@current``); other options are ServeConfig's defaults. `serve run` and
`serve deploy` use ``rankformer.serve.app:app_builder`` with ``args`` instead (deploy/serve/serve.yaml).
"""

import os

from rankformer.config.serve import ServeConfig
from rankformer.serve.app import build_app

app = build_app(ServeConfig(model=os.environ.get("RANKFORMER_MODEL", "models:/rankformer@current")))
