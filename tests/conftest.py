def _runs_tests(config) -> bool:
    """False in pytest-xdist's controller, which only hands tests to its workers."""
    return hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)


def pytest_configure(config):
    """Tests run in float64 on one thread per process; the xdist controller skips the torch
    import (about a second of every `-n` run)."""
    if _runs_tests(config):
        import torch

        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the end-to-end checks marked slow (several seconds each) go first,
    so that the workers do not end on one long test while the other waits; a plain run keeps
    the file order (its subprocess checks overlap the rest in the background instead)."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session):
    """Start the collected end-to-end subprocess checks (tests/background.py) in the background,
    so that they overlap the in-process tests; not under pytest-xdist (its workers share the
    cores already) nor with --collect-only."""
    from tests import background

    config = session.config
    if (hasattr(config, "workerinput") or getattr(config.option, "numprocesses", None)
            or config.option.collectonly):
        return
    background.start_in_background([item.nodeid for item in session.items])


def pytest_sessionfinish(session):
    from tests import background

    background.stop_all()


def pytest_unconfigure(config):
    """The last hook of a test process: move every object to the permanent generation, so that
    the interpreter's exit does not run full garbage collections over torch's and the tests'
    heap (about 2 s per xdist worker after a whole run, 0.5 s after `import torch` alone). No
    object is used after this: it only skips the exit's collections."""
    import gc

    gc.freeze()
