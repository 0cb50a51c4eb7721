"""Cost-model calibration: measured rates are positive, cached as JSON, reloaded, installed for planning."""
import pytest

from mpo_core.cost import DEFAULT_MODELS, DeviceModel, device_model, set_device_model
from mpo_core.cost import calibration


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MPO_CORE_CACHE", str(tmp_path))
    yield tmp_path
    set_device_model("cpu", None)


def test_measured_rates_are_positive_and_ordered(monkeypatch):
    monkeypatch.setattr(calibration, "_GEMMS", ((64, 64, 64), (128, 128, 128)))
    m = calibration.measure_device_model("cpu")
    assert m.overhead > 0 and m.bandwidth > 0 and m.vector_flops > 0
    assert set(m.matmul_flops) == {"float32", "float64", "bfloat16"}
    assert all(v > 0 for v in m.matmul_flops.values())
    assert m.overhead < 1e-2  # a planned op costs microseconds, not tens of milliseconds


def test_use_calibration_caches_reloads_and_installs(cache, monkeypatch):
    fake = DeviceModel("cpu (calibrated, test)", {"float32": 1e11, "float64": 5e10}, 2e10, 3e10, 2e-5)
    calls = []
    monkeypatch.setattr(calibration, "measure_device_model", lambda device: calls.append(device) or fake)
    assert calibration.load_calibration("cpu") is None
    assert calibration.use_calibration("cpu") == fake and len(calls) == 1
    assert calibration.cache_path("cpu").exists() and device_model("cpu") == fake
    set_device_model("cpu", None)
    assert device_model("cpu") == DEFAULT_MODELS["cpu"]
    assert calibration.use_calibration("cpu") == fake and len(calls) == 1  # from the cache, not measured again
    assert calibration.use_calibration("cpu", remeasure=True) == fake and len(calls) == 2


def test_a_corrupt_cache_is_ignored(cache):
    path = calibration.cache_path("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert calibration.load_calibration("cpu") is None
