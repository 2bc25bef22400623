"""isotropy_by_layer / IsotropyState against direct computations on capture() output."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch
from conftest import TINY_TEXTS

import vsem_lens as vl
from vsem_lens.core.errors import InputError
from vsem_lens.geometry import (
    IsotropyState,
    average_cosine,
    isoscore,
    isoscore_star,
    isotropy_by_layer,
    outlier_dimensions,
    participation_ratio,
)
from vsem_lens.lenses.base import Lens
from vsem_lens.lenses.tuned import TunedLens, tuned_lens_cache_path

TOL = 1e-10


def _direct(model, acts, site, layer, frame):
    x = acts.layer(site, layer) if site != "embed" else acts["embed"][0]
    if frame == "final_norm":
        with torch.no_grad():
            x = model.final_norm(x)
    return x


def test_matches_direct_isoscore_on_capture(tiny_model):
    sites = ("embed", "resid_post", "mlp_out", "attn_out")
    df = isotropy_by_layer(tiny_model, TINY_TEXTS, sites=sites, batch_size=4, k_outliers=3)
    acts = vl.capture(tiny_model, TINY_TEXTS, sites=sites)
    # final_norm only on residual sites: embed 2 + resid_post 3 x 2 + mlp/attn 3 x 1 each.
    assert len(df) == 2 + 6 + 3 + 3
    assert set(df.query("site in ['mlp_out', 'attn_out']").frame) == {"raw"}
    for row in df.itertuples():
        x = _direct(tiny_model, acts, row.site, row.layer, row.frame)
        assert row.n_tokens == x.shape[0]
        assert abs(row.isoscore - isoscore(x)) <= TOL
        assert abs(row.participation_ratio - participation_ratio(x)) <= 1e-8  # PR is in [1, d]
        assert abs(row.average_cosine - average_cosine(x)) <= TOL
        c0 = torch.eye(x.shape[1], dtype=torch.float64) * torch.cov(x.double().T).trace() / x.shape[1]
        assert abs(row.isoscore_star - float(isoscore_star(x.detach(), zeta=0.2, c0=c0))) <= TOL
        idx, share = outlier_dimensions(x, k=3)
        assert row.outlier_dims == idx.tolist()
        assert abs(row.outlier_variance_share - float(share.sum())) <= TOL
        assert 0.0 <= row.isoscore <= 1.0 and 0.0 <= row.isoscore_star <= 1.0


def test_batching_does_not_change_results(tiny_model):
    """The same activations folded in different token batches give the same table (float64 rounding)."""
    acts = vl.capture(tiny_model, TINY_TEXTS)["resid_post"]
    layers = list(range(tiny_model.n_layers))
    tables = []
    for step in (1, 7, acts.shape[1]):
        state = IsotropyState.for_model(tiny_model)
        for start in range(0, acts.shape[1], step):
            for frame in ("raw", "final_norm"):
                state.update_points("resid_post", frame, layers, acts[:, start : start + step])
        tables.append(state.result())
    for other in tables[1:]:
        assert other.n_tokens.tolist() == tables[0].n_tokens.tolist()
        for col in ("isoscore", "isoscore_star", "average_cosine", "participation_ratio", "outlier_variance_share"):
            assert (other[col] - tables[0][col]).abs().max() <= TOL * (100 if col == "participation_ratio" else 1), col
        assert other.outlier_dims.tolist() == tables[0].outlier_dims.tolist()


def test_batch_size_end_to_end(tiny_model):
    """End to end, batch_size changes only the model's own float32 rounding (padding changes the
    forward's shapes: activations differ by ~1e-8 relative), not the statistics."""
    a = isotropy_by_layer(tiny_model, TINY_TEXTS, batch_size=1)
    b = isotropy_by_layer(tiny_model, TINY_TEXTS, batch_size=6)
    assert a[["layer", "site", "frame", "n_tokens"]].equals(b[["layer", "site", "frame", "n_tokens"]])
    for col in ("isoscore", "isoscore_star", "average_cosine", "outlier_variance_share"):
        assert (a[col] - b[col]).abs().max() <= 1e-7, col
    assert a.outlier_dims.tolist() == b.outlier_dims.tolist()


def test_state_merge_and_state_dict_roundtrip(tiny_model):
    state = IsotropyState.for_model(tiny_model, layers=[0, 2])
    halves = [IsotropyState.for_model(tiny_model, layers=[0, 2]) for _ in range(2)]
    for i, batch in enumerate(vl.iter_capture(tiny_model, TINY_TEXTS, layers=state.layers, batch_size=2)):
        state.update(batch)
        halves[i % 2].update(batch)
    restored = IsotropyState.from_state_dict(pickle.loads(pickle.dumps(halves[1].state_dict())))
    merged = halves[0].copy().merge(restored).result()
    whole = state.result()
    assert (merged.isoscore - whole.isoscore).abs().max() <= TOL
    assert (merged.average_cosine - whole.average_cosine).abs().max() <= TOL
    assert merged.n_tokens.tolist() == whole.n_tokens.tolist()
    with pytest.raises(InputError, match="different"):
        state.merge(IsotropyState.for_model(tiny_model, layers=[1]))


def test_identity_reference_and_attrs(tiny_model):
    df = isotropy_by_layer(tiny_model, TINY_TEXTS, layers=[1], frames="raw", star_reference="identity", zeta=0.5)
    x = vl.capture(tiny_model, TINY_TEXTS, layers=[1])["resid_post"][0]
    assert abs(df.isoscore_star.iloc[0] - float(isoscore_star(x, zeta=0.5))) <= TOL
    assert df.attrs == {"zeta": 0.5, "star_reference": "identity", "k_outliers": 5}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sites": "resid"}, "unknown site"),
        ({"frames": "normed"}, "unknown frame"),
        ({"frames": "tuned"}, "needs a trained tuned lens"),
        ({"sites": "mlp_out", "frames": "final_norm"}, "add 'raw'"),
        ({"layers": [7]}, "out of range"),
        ({"layers": []}, "no layers"),
        ({"k_outliers": 0}, "k_outliers"),
        ({"zeta": 2.0}, "zeta"),
        ({"star_reference": "eye"}, "star_reference"),
    ],
)
def test_clear_errors(tiny_model, kwargs, match):
    with pytest.raises(InputError, match=match):
        isotropy_by_layer(tiny_model, TINY_TEXTS[:1], **kwargs)


def test_too_few_tokens(tiny_model):
    with pytest.raises(InputError, match="at least 2"):
        isotropy_by_layer(tiny_model, "A", layers=[0])


class Stretch(Lens):
    """A custom frame: the final norm, then a per-layer diagonal stretch and shift (not rotation or
    scale invariant, so IsoScore sees it)."""

    frame = "stretch"

    def __init__(self, model):
        self.model = model
        gen = torch.Generator().manual_seed(1)
        self.scale = torch.rand(model.n_layers, model.d_model, generator=gen) * 3 + 0.1
        self.shift = torch.randn(model.n_layers, model.d_model, generator=gen)

    def forward(self, h, layer):
        return self.model.final_norm(h) * self.scale[layer] + self.shift[layer]


def random_tuned_lens(model):
    """A tuned lens with random (untrained) translators: a layer-dependent frame, no training needed."""
    gen = torch.Generator().manual_seed(2)
    n_tr, d = model.n_layers - 1, model.d_model
    return TunedLens(model, 0.3 * torch.randn(n_tr, d, d, generator=gen), 0.3 * torch.randn(n_tr, d, generator=gen))


def _check_frame_rows(model, df, frame_label, transform):
    # The same batches as the pass under test: SDPA attention on padded batches depends on the batch at
    # float32 rounding (~1e-7), which IsoScore would show at ~1e-10.
    acts = vl.capture(model, TINY_TEXTS, sites=("embed", "resid_post"), batch_size=3)
    rows = df[df.frame == frame_label]
    assert len(rows) == 1 + model.n_layers
    for row in rows.itertuples():
        raw = acts["embed"][0] if row.site == "embed" else acts.layer(row.site, row.layer)
        with torch.no_grad():
            x = transform(raw, row.layer)
        assert row.n_tokens == x.shape[0]
        assert abs(row.isoscore - isoscore(x)) <= TOL
        assert abs(row.average_cosine - average_cosine(x)) <= TOL
        assert row.outlier_dims == outlier_dimensions(x, k=5)[0].tolist()


def test_custom_lens_frame_equals_transforming_by_hand(tiny_model):
    lens = Stretch(tiny_model)
    df = isotropy_by_layer(tiny_model, TINY_TEXTS, sites=("embed", "resid_post"), frames=("raw", lens), batch_size=3)
    assert list(dict.fromkeys(df.frame)) == ["raw", "stretch"]
    _check_frame_rows(tiny_model, df, "stretch", lens)
    # The raw rows do not depend on which other frames are tracked.
    alone = isotropy_by_layer(tiny_model, TINY_TEXTS, sites=("embed", "resid_post"), frames="raw", batch_size=3)
    pd.testing.assert_frame_equal(df[df.frame == "raw"].reset_index(drop=True), alone, check_exact=True)


def test_lens_without_frame_name_is_labelled_by_its_class(tiny_model):
    class Halved(Lens):
        def forward(self, h, layer):
            return h / 2

    df = isotropy_by_layer(tiny_model, TINY_TEXTS[:3], frames=[Halved()], layers=[1])
    assert df.frame.tolist() == ["Halved"]
    raw = isotropy_by_layer(tiny_model, TINY_TEXTS[:3], frames="raw", layers=[1])
    assert df.isoscore.iloc[0] == pytest.approx(raw.isoscore.iloc[0], abs=TOL)  # IsoScore is scale invariant


def test_tuned_frame_by_lens_and_by_cached_name(tiny_model, tmp_path, monkeypatch):
    lens = random_tuned_lens(tiny_model)
    by_lens = isotropy_by_layer(tiny_model, TINY_TEXTS, sites=("embed", "resid_post"), frames=[lens], batch_size=3)
    _check_frame_rows(tiny_model, by_lens, "tuned", lens)
    monkeypatch.setenv("VSEM_LENS_CACHE", str(tmp_path / "cache"))
    lens.save(tuned_lens_cache_path(tiny_model))
    by_name = isotropy_by_layer(tiny_model, TINY_TEXTS, sites=("embed", "resid_post"), frames="tuned", batch_size=3)
    pd.testing.assert_frame_equal(by_name, by_lens, check_exact=True)


def test_state_with_lenses_given_directly(tiny_model):
    lens = Stretch(tiny_model)
    acts = vl.capture(tiny_model, TINY_TEXTS)["resid_post"]
    layers = list(range(tiny_model.n_layers))
    state = IsotropyState([("resid_post", layer, "stretch") for layer in layers], tiny_model.d_model,
                          lenses={"stretch": lens})
    state.update_points("resid_post", "stretch", layers, acts)
    by_hand = IsotropyState([("resid_post", layer, "raw") for layer in layers], tiny_model.d_model)
    with torch.no_grad():
        by_hand.update_points("resid_post", "raw", layers, torch.stack([lens(acts[i], i) for i in layers]))
    cols = ["isoscore", "isoscore_star", "average_cosine", "participation_ratio", "outlier_variance_share"]
    assert (state.result()[cols] - by_hand.result()[cols]).abs().max().max() <= TOL
    # A frame with no lens is refused at update, while merge/result/state_dict need none.
    bare = IsotropyState.from_state_dict(state.state_dict())
    assert bare.result().equals(state.result())
    with pytest.raises(InputError, match="no lens for frame 'stretch'"):
        bare.update_points("resid_post", "stretch", layers, acts)


def test_frame_errors(tiny_model):
    with pytest.raises(InputError, match="distinct frame names"):
        isotropy_by_layer(tiny_model, TINY_TEXTS[:1], frames=[Stretch(tiny_model), Stretch(tiny_model)])
    with pytest.raises(InputError, match="add 'raw'"):
        isotropy_by_layer(tiny_model, TINY_TEXTS[:1], sites="attn_out", frames=[Stretch(tiny_model)])
    with pytest.raises(InputError, match="no frames"):
        isotropy_by_layer(tiny_model, TINY_TEXTS[:1], frames=[])


@pytest.mark.embedded
def test_embedded_isotropy_ranges(embedded):
    texts = ["The capital of France is Paris.", "A cat sat on the mat and looked at the dog."]
    df = isotropy_by_layer(embedded, texts, layers=[0, 15, 29])
    assert len(df) == 6
    assert df.isoscore.between(0, 1).all() and df.isoscore_star.between(0, 1).all()
    assert df.average_cosine.between(-1, 1).all()
    assert (df.participation_ratio >= 1).all()
    # Fewer tokens than dimensions: the covariance has rank <= n_tokens - 1, so PR <= n_tokens - 1.
    assert (df.participation_ratio <= df.n_tokens - 1 + 1e-9).all()
