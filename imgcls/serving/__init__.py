"""Real-time classification: ``imgcls serve`` on Ray Serve (``app``: the deployment and its
HTTP endpoints; ``deploy``: its config, updates and shutdown; ``online_log``: the
predictions rows the replicas write for ``monitor`` and ``review``)."""
