"""The inference worker process: the IO loop around one engine.

``loop`` is the loop, ``transport`` what it needs from a broker, ``redis_streams`` that
broker on Redis, ``engines`` which engine a model's spec names. Nothing here imports
Django, ``tenants`` or ``webplatform``; the web side's embedded mode runs the same loop in a
thread (``inference.client.inprocess``).
"""
