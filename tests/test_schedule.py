import pytest

from fastcram.train.schedule import BudgetClock, accumulation_steps, lr_multiplier

from .helpers import FakeClock


@pytest.mark.parametrize("p, lr, accum", [(0.0, 0.25, 1), (0.3, 0.55, 16), (0.6, 0.85, 32), (0.75, 1.0, 32),
                                          (1.0, 0.0, 32)])
def test_lr_and_batch_at_progress(p, lr, accum):
    clock = FakeClock(tick=0.0)
    budget = BudgetClock(1000.0, now=clock)
    clock.t += p * 1000.0  # move the fake clock to progress p
    assert budget.progress() == pytest.approx(p)
    assert lr_multiplier(budget.progress()) == pytest.approx(lr)
    # micro-batch 256 -> 8192 sequences (32 micro-batches) by 60% of the budget
    n = accumulation_steps(budget.progress(), 256, 8192, 0.6)
    assert n == accum and n * 256 <= 8192


def test_lr_peaks_at_three_quarters():
    ps = [i / 1000 for i in range(1001)]
    best = max(ps, key=lr_multiplier)
    assert best == pytest.approx(0.75)


def test_batch_ramp_is_monotone_and_in_micro_batch_multiples():
    seen = [accumulation_steps(i / 100, 96, 8192, 0.6) for i in range(101)]
    assert seen == sorted(seen) and seen[0] == 1 and seen[-1] == round(8192 / 96)


def test_budget_clock_resume_and_validation():
    clock = FakeClock(tick=0.0)
    b = BudgetClock(100.0, spent_s=40.0, now=clock)
    assert b.elapsed() == 40.0 and b.remaining() == 60.0
    clock.t += 60.0
    assert b.done()
    with pytest.raises(ValueError):
        BudgetClock(0.0)
