"""Ray reads its Serve settings when ``ray.serve`` is first imported, in the test process too
(the app builder checks for HAProxy there): set them before any test module imports Ray."""

import os

from app.serve_env import serve_env

os.environ.update(serve_env(local=True))
