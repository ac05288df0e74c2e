"""The ML backend process: the Flask app, the coordinator of one request, caches and memories,
the background encoder and the metrics."""
