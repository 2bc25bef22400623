"""The layerwise semantic report (``vsem-lens report``): the corpus plan, the streamed pass and its
checkpoints, the result record, its text and figures, and the self-contained HTML page.
"""

from .build import build_report
from .html import resend_plotly
from .plan import CorpusPlan, plan_corpus
from .probe import Probe, probe
from .record import Report, ReportWriteError, check_report_destination

__all__ = [
    "CorpusPlan",
    "Probe",
    "Report",
    "ReportWriteError",
    "check_report_destination",
    "build_report",
    "plan_corpus",
    "probe",
    "resend_plotly",
]
