"""Inference: image files in, one predictions row per file out.

In: a folder, prefix, glob, tar or manifest of images on any fsspec store, and a
checkpoint (or an ensemble, or an ONNX export). ``inputs`` plans the inputs into shards
once; ``program`` builds the model program the workers run; per shard, ``read`` fetches
the bytes (tars streamed member by member), ``decode`` turns them into eval-geometry
images or error rows, ``model_stage`` labels them, and ``sink`` writes the shard's
Parquet part atomically from the worker. ``bulk`` runs the whole job, resumably;
``pipeline`` is the same stages as a Ray Data Dataset (evaluation uses it); ``finished``
checks an output's completion from its files alone. Out: Parquet parts of the
predictions table (``schema``). ``export`` writes the model as ONNX, TorchScript and
safetensors.
"""
