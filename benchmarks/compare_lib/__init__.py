"""The pieces of benchmarks/compare.py (the entry point), split by concern.

    common    paths, runtime tables, the GGUF and Hamlet
    machine   CPU, load from other processes, memory bandwidth, git state
    workers   the per-runtime timing workers (run in each peer venv)
    builders  building the peers' models (run in the venv that has the tools)
    runner    the Runner (builds models, runs workers), prompts, --only selection
    analysis  merging retries, the decode bandwidth ceiling, greedy agreement
    report    markdown tables and the PNG chart

compare.py is run by every venv's python (workers, builders, the chart): keep the top-level imports of
these modules to the standard library.
"""
