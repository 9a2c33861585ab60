"""--ftrace: schedule the threads of a threaded test, find the interleaving that breaks it and
replay it. The hooks call `session.FtraceSession` (one per pytest session, made at configure)
and its `start(item, threads, iterations)` for each threaded test; the run modes are in
`modes/`, one class each.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""
