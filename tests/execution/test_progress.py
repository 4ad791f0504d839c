from raymerge.execution import progress as progress_module
from raymerge.execution.progress import Progress


def test_steady_rate_leaves_out_the_first_and_last_items(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    p = Progress(total_bytes=1000, total_items=10, tty=False)
    # A slow first item (warm-up), eight items at 100 bytes/s, a slow last one.
    for step in [5.0] + [1.0] * 8 + [5.0]:
        now[0] += step
        p.add(100)
    p.stop()
    assert p.rate() == 1000 / 18.0
    assert p.steady_rate() == 100.0


def test_steady_rate_of_a_short_run_is_the_whole_rate(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    p = Progress(total_bytes=200, total_items=2, tty=False)
    for _ in range(2):
        now[0] += 2.0
        p.add(100)
    p.stop()
    assert p.steady_rate() == p.rate() == 50.0
