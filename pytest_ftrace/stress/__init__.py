"""The stress runner (`--threads N --iterations M`): a test's body runs in N worker threads for
M rounds (`runner.ThreadedRun`), each thread with its own function-scoped fixtures
(`fixtures.ThreadFixtures`). --ftrace plugs into it through `runner.Hooks`.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""
