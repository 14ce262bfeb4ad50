"""`rankformer perturb stats --mixture`: a two-component Gaussian mixture over the perturbations'
mean effects (scikit-learn's), as the reference's mixture-model mode separates impactful from
non-impactful perturbations; each perturbation's posterior of belonging to the component of
larger mean."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rankformer.errors import InputError


def impact_mixture(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """``table`` (the per-perturbation statistics) with ``impact_posterior``: each perturbation's
    posterior probability of the higher-mean component of a two-component Gaussian mixture fitted
    to the mean effects (scikit-learn's GaussianMixture, seeded), and ``impactful`` (posterior >
    0.5). Perturbations without a finite mean effect get NaN."""
    from sklearn.mixture import GaussianMixture

    x = table["effect_mean"].to_numpy(dtype=np.float64)
    ok = np.isfinite(x)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0:
        raise InputError(
            f"--mixture needs at least 3 perturbations with different mean effects; this run has "
            f"{int(ok.sum())} with a finite effect"
            + ("" if ok.sum() < 3 else ", all equal")
            + " (perturb more genes, e.g. --mode all)"
        )
    gm = GaussianMixture(n_components=2, random_state=seed, n_init=5).fit(x[ok, None])
    high = int(np.argmax(gm.means_[:, 0]))
    post = np.full(len(x), np.nan)
    post[ok] = gm.predict_proba(x[ok, None])[:, high]
    out = table.copy()
    out["impact_posterior"] = post
    out["impactful"] = post > 0.5
    out.attrs.update(table.attrs)
    out.attrs["mixture"] = {
        "means": gm.means_[:, 0].tolist(),
        "weights": gm.weights_.tolist(),
        "impactful_component": high,
    }
    return out
