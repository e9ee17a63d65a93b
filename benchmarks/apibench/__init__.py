"""API benchmark (``benchmarks/api.py`` is the command line): the pieces by job.

- ``request``: the standard request (a noise JPEG, a short question, greedy, ``max_tokens``
  8, answer cache off), its JSON body, and the model it asks for;
- ``targets``: what the load is sent to: the HTTP API of a server, or the in-process
  inference client alone (the ``engine`` floor);
- ``load``: the closed-loop load client, one measurement and the interleaved rounds;
- ``processes``: subprocesses: run and check, start and stop, wait until ready, uvicorn;
- ``setups``: the ``embedded`` and ``redis`` servers (environment, scratch PostgreSQL
  database, Redis key prefixes, inference worker) and the tiny checkpoint;
- ``provision``: a tenant and API key in a setup's database, made in a subprocess of the
  command line (``benchmarks/api.py provision``) inside that setup's environment;
- ``report``: the result rows, the best round of each, and the platform-overhead summary.
"""
