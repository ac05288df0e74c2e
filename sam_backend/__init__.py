"""sam-backend: Segment Anything ML backend and mask exporter for Label Studio."""

__version__ = "0.1.0"
