"""vsem-lens: read a language model's latent space in the coordinates of its own vocabulary.

The package is built in one-way layers (docs/architecture.md):
``core`` <- ``lenses`` <- ``readout`` <- ``geometry`` <- ``calibration`` / ``taskspace`` <- ``report`` <- ``cli``.
The names below are the everyday entry points; everything else lives in its subpackage
(``vsem_lens.geometry.basis_coherence``, ``vsem_lens.calibration.run_baselines``, ...).

Example:
    >>> import vsem_lens as vl                                  # doctest: +SKIP
    >>> model = vl.load_model()                                 # embedded SmolLM2-135M-Instruct
    >>> basis = vl.SemanticBasis.from_model(model)              # pinv of the unembedding
    >>> df = vl.layerwise_affinity(model, "The capital of France is")
    >>> vl.probe(model, "The capital of France is")             # heatmaps of every layer, in Jupyter
"""

from . import calibration, core, geometry, lenses, readout, report, taskspace
from .calibration import CalibratedModel
from .core import Activations, HookedModel, VsemLensError, capture, iter_capture, load_corpus, load_model
from .geometry import isotropy_by_layer
from .lenses import FinalNormLens, Lens, RawLens, TunedLens, resolve_frame
from .readout import SemanticBasis, iter_layer_readouts, layerwise_affinity, logit_lens, vocab_affinity
from .report import Probe, Report, build_report, probe

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "CalibratedModel",
    "FinalNormLens",
    "HookedModel",
    "Lens",
    "Probe",
    "RawLens",
    "Report",
    "SemanticBasis",
    "TunedLens",
    "VsemLensError",
    "build_report",
    "calibration",
    "capture",
    "core",
    "geometry",
    "isotropy_by_layer",
    "iter_capture",
    "iter_layer_readouts",
    "layerwise_affinity",
    "lenses",
    "load_corpus",
    "load_model",
    "logit_lens",
    "probe",
    "readout",
    "report",
    "resolve_frame",
    "taskspace",
    "vocab_affinity",
]
