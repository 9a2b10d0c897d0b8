"""Progress lines: tokens/s and the ETA leave the first (compiling) step out."""
from structmat.train import metrics


def test_first_step_is_timed_apart(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(metrics.time, "time", lambda: now[0])
  p = metrics.Progress(total_steps=11, start_step=0, tokens_per_step=1000)
  assert p.tokens_per_sec(0) == 0.0   # nothing ran yet
  now[0] += 60.0                      # step 1: a minute of compiling
  assert p.first_step_done(1) == 60.0
  assert p.tokens_per_sec(1) == 1000 / 60.0  # its own rate until step 2
  now[0] += 2.0                       # steps 2 and 3: a second each
  assert p.tokens_per_sec(3) == 1000.0
  assert "1,000 tokens/s  ETA 0.1 min" in p.line(3, 2.5)  # 8 steps x 1 s


def test_resumed_at_the_end_reports_nothing_run(monkeypatch):
  monkeypatch.setattr(metrics.time, "time", lambda: 5.0)
  p = metrics.Progress(total_steps=4, start_step=4, tokens_per_step=10)
  assert p.tokens_per_sec(4) == 0.0 and "ETA 0.0 min" in p.line(4, 1.0)
