from imgcls.progress import EpochProgress, bar, eta_text


def test_eta_text():
    assert eta_text(10, 10, 5.0) == "done"
    assert eta_text(0, 10, 0.0) == "ETA ?"
    assert eta_text(25, 650, 5.0) == "ETA 2m05s"


def test_bar_is_clamped():
    assert bar(0.5, 10) == "[#####.....]"
    assert bar(1.7, 4) == "[####]" and bar(-1, 4) == "[....]"


def test_epoch_progress_says_a_line_at_most_every_interval_and_none_at_the_end():
    now = [0.0]
    said = []
    progress = EpochProgress(epoch=2, epochs=10, total=2700, world=2, say=said.append, every=10.0,
                             clock=lambda: now[0])
    for _ in range(9):  # 9 steps of 50 images per worker, one second apart: nothing due yet
        now[0] += 1.0
        assert progress.step(50) is None
    now[0] += 1.0
    line = progress.step(50)  # 10 s: 500 images here, 1,000 of 2,700 over both workers
    assert line == "epoch 3/10 [#######.............] 37%  1,000 / 2,700 images  100 images/s  ETA 0m17s"
    assert said == [line]
    now[0] += 5.0
    assert progress.step(50) is None  # 5 s since the last line
    now[0] += 100.0
    assert progress.step(800) is None  # the epoch's last step: its epoch line follows instead
    assert said == [line]
