"""What the team's clicks cost (`sam-backend report`): the interaction log joined to the accepted annotations.

`objects` joins (the rule and its table), `figures` counts, `page` draws the HTML, `driver` reads and writes."""

from sam_backend.sidecar.report.driver import ReportError, ReportPaths, build_report

__all__ = ["ReportError", "ReportPaths", "build_report"]
