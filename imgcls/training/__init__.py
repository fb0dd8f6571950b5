"""Training: labelled images in, checkpoints out.

In: a ``JobConfig`` (a folder or manifest of labelled images, on any fsspec store; a
model; the schedule). ``trainer.fit`` lists and splits the images (``imgcls.labelled``),
decodes each split once into a uint8 cache (``cache``), and runs ``loop.train_loop_per_worker``
on Ray Train workers, which augment whole batches on their device (``augment``).
Optionally a linear probe first (``probe``), or a search over settings (``tune``).
Out: a run folder with checkpoints (``imgcls.checkpoint``), the best one as ``best/``,
the splits, the history and the decoded cache.
"""
