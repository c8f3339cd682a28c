"""``--no-progress-bar``'s line display (trime.io_utils.ProgressLines): periodic lines, one last line, no repeats."""

from trime.io_utils import ProgressLines


def lines_of(updates: list[int], every_seconds_per_update: list[float]) -> list[str]:
    out: list[str] = []
    meter = ProgressLines(total=sum(updates), desc="keys", unit="tok", log=out.append)
    for n, every in zip(updates, every_seconds_per_update):
        meter.every_seconds = every
        meter.update(n)
    meter.close()
    meter.close()  # closing twice adds nothing
    return out


def test_a_line_per_period_and_the_last_count_once():
    out = lines_of([1, 1, 1, 1], [0, 0, 0, 0])
    assert [line.split(" tok")[0] for line in out] == ["keys: 1/4", "keys: 2/4", "keys: 3/4", "keys: 4/4"]


def test_close_adds_the_last_count_when_the_period_did_not():
    out = lines_of([1, 3], [0, 3600])
    assert [line.split(" tok")[0] for line in out] == ["keys: 1/4", "keys: 4/4"]
    assert "left" in out[0] and "left" not in out[1]


def test_a_short_job_prints_nothing():
    assert lines_of([4], [3600]) == []
