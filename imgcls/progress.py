"""Progress a person can read on a terminal and in a job's log alike: plain lines of
done / total, rate and ETA, at most one every few seconds (no carriage returns, which a
log file and Ray's per-line log forwarding would garble)."""

import time
from typing import Callable, Optional

EVERY_SECONDS = 10.0


def eta_text(done: float, total: float, rate: float) -> str:
    """'done', 'ETA 2m05s', or 'ETA ?' before any rate is known."""
    if done >= total:
        return "done"
    if rate <= 0:
        return "ETA ?"
    eta = (total - done) / rate
    return f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"


def bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class EpochProgress:
    """Lines within a training epoch: ``epoch 3/10 [#####...............] 26%  700 / 2,700
    images  312 images/s  ETA 0m06s``, one at most every ``every`` seconds, none for an
    epoch shorter than that (its epoch line follows at once).

    A worker counts its own images; with ``world`` equal parts, the job's share done is
    that count times ``world``, against ``total`` (the whole training split).
    """

    def __init__(self, epoch: int, epochs: int, total: int, world: int, say: Callable[[str], None],
                 every: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.epoch, self.epochs, self.total, self.world = epoch, epochs, total, world
        self.say, self.every, self.clock = say, every, clock
        self.start = self.last = clock()
        self.seen = 0

    def line(self) -> str:
        done = min(self.total, self.seen * self.world)
        rate = done / max(1e-9, self.clock() - self.start)
        return (f"epoch {self.epoch + 1}/{self.epochs} {bar(done / max(1, self.total))} "
                f"{100 * done / max(1, self.total):.0f}%  {done:,} / {self.total:,} images  {rate:.0f} images/s  "
                f"{eta_text(done, self.total, rate)}")

    def step(self, images: int) -> Optional[str]:
        """Counts a step's images; says (and returns) a line when one is due."""
        self.seen += images
        now = self.clock()
        if now - self.last < self.every or self.seen * self.world >= self.total:
            return None
        self.last = now
        text = self.line()
        self.say(text)
        return text
