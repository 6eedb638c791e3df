"""`morphserve evaluate`: a pre-registered, repeated head-to-head against plain vLLM.

suite.py (the YAML schema), systems.py (how each system is started and warmed up),
runner.py (the run loop: fresh servers, memory sampling, resumable folders),
quality.py (the precision of every token, from the transition log), aggregate.py
(medians, ranges, ties, targets), render.py (table and figure), cli.py.
"""
