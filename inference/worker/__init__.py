"""The inference worker process: the IO loop around one engine, and its entry point.

``python -m inference.worker --model NAME`` (``main``) serves one model from the Redis queue
with settings of its own, read from the environment (``settings``). ``loop`` is the loop,
``transport`` what it needs from a broker, ``redis_streams`` that broker on Redis, ``engines``
which engine a model's spec names. Nothing here imports ``tenants``, ``webplatform`` or
Django's settings; the web side's embedded mode runs the same loop in a thread
(``inference.client.inprocess``).
"""
