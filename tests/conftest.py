"""One Ray instance per test session; tests that need it ask for the `ray_session` fixture.

Every test that starts Ray carries the `ray` marker, so `pytest -m "not ray"` starts none. Two checks keep it so:
collection stops on a test that asks for `ray_session` without the marker, and an unmarked test that starts Ray
in the test process some other way (Ray Data, a TorchTrainer, `ray.init`) fails with its name.
"""

import os
import sys

import pytest

# Quieter, faster Ray for tests: one print per worker, no preemption watcher,
# explicit auth mode (silences the token warning), and a short controller poll so report() is cheap.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if "ray_session" in item.fixturenames and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError("these tests start Ray (they use the ray_session fixture) but lack "
                                "@pytest.mark.ray, so `-m \"not ray\"` would start Ray:\n  " + "\n  ".join(unmarked))


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported here: a test that did not import Ray did not start it
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request):
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    before = _ray_is_up()
    yield
    if not before and _ray_is_up():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray without @pytest.mark.ray", pytrace=False)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raydae.launch import start_local_ray

    if not ray.is_initialized():
        # ray.init(address="local", num_cpus=4, include_dashboard=False), whose workers know its address
        # (Train's placement-group cleaner then asks this cluster, not whichever one `ray start` wrote last).
        start_local_ray(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
