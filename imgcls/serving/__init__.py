"""Serving: images sent over HTTP in, one answer per image out (``imgcls serve``).

In: a checkpoint (or an ensemble, or an ONNX export) and requests carrying image bytes.
``deploy`` builds the Serve config and deploys it (updates change only its model);
``app`` is the deployment each replica runs: the bulk path's decode and model program
(``inference.decode``, ``inference.program``, ``inference.model_stage``) behind
``serve.batch``, with the /v1 and Open Inference Protocol endpoints. Out: JSON answers,
and with a log folder, predictions rows (``online_log``) that ``monitor`` and ``review`` read.
"""
