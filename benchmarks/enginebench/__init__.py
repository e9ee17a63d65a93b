"""Engine benchmarks (``benchmarks/engine.py`` is the command line): the pieces by job.

- ``models``: the runner under test (tiny checkpoint, a checkpoint folder, or a randomly
  initialised full-size GLM-4.6V-Flash built on the GPU) and saving it as a checkpoint;
- ``workloads``: the standard request, and the timed runs of the engine, of naive
  ``model.generate`` and of its static-cache (compiled) path;
- ``mixed``: inter-token latency of running streams while large prompts arrive;
- ``profiling``: where a step's time goes (device kernels against host);
- ``startup``: process start to a warmed engine, in a fresh process;
- ``record``: the record of a run (JSON lines, written as it goes) and its time budget;
- ``report``: the record's Markdown tables.

Nothing here imports Django: a bare GPU host with torch and transformers runs it.
"""
