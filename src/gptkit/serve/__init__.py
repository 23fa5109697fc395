"""Serving: an OpenAI-compatible HTTP API (`app`), the continuous-batching engine behind
it (`engine`) and the browser playground (`playground.html`). Model logic stays in the
layers below; this package only schedules requests and speaks HTTP.
"""

from gptkit.serve.app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
