"""Multi-host start-up on a single process (the two-process run is tests/train/test_multihost.py)."""

from llama_jax import distributed


def test_single_process_needs_no_distributed_init(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert distributed.maybe_initialize_distributed() is False
    assert distributed.is_main_process()
