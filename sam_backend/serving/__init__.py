"""The ML backend process: the Flask app, the coordinator of one request, caches and memories (in the
process, and shared through Redis or a directory), the background encoder and prefetch, stage timings and the
metrics."""
