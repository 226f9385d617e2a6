"""``ecglm serve``: a bundle behind an HTTP API built on LitServe (docs/serving.md).

Above the model layer: :mod:`ecglm.serving.requests` reads and checks what a client sent,
:mod:`ecglm.serving.spec` holds the endpoints, :mod:`ecglm.serving.api` the model and its batched
answers, :mod:`ecglm.serving.app` the server. Needs the ``serve`` extra (``pip install ecglm[serve]``).
"""
