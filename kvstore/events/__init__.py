"""KV events: every tier change published to routers in vLLM's wire format.

``wire`` is the format (msgspec structs that encode exactly as vLLM's ``kv_events`` classes,
the media names, the frames); ``log`` records tier changes on the daemon's event loop (the
block table calls it); ``publisher`` owns the ZMQ sockets and the thread that encodes, sends,
keeps the replay buffer and answers replay and snapshot requests; ``subscriber`` is the router
side (live stream, gap detection, replay, snapshot); ``dynamo`` feeds NVIDIA Dynamo's
``RadixTree`` from one or more daemons. See docs/routing.md.
"""
