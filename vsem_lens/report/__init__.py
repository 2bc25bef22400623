"""The layerwise semantic report (``vsem-lens report``): the streamed corpus pass, the result record,
its figures and the self-contained HTML page.
"""

from .build import Report, build_report

__all__ = [
    "Report",
    "build_report",
]
