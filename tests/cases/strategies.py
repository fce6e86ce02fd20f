"""Hypothesis strategies shared by the convolution tests."""
from hypothesis import strategies as st


@st.composite
def conv_cases(draw, dims=(1, 2, 3)):
    d = draw(st.sampled_from(dims))
    g = draw(st.integers(1, 2))
    e, c, n = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    same = draw(st.booleans())
    ks, ss, ds, ps, isz = [], [], [], [], []
    for _ in range(d):
        k = draw(st.integers(1, 3))
        s = 1 if same else draw(st.integers(1, 3))
        dil = draw(st.integers(1, 2))
        p = 0 if same else draw(st.integers(0, 2))
        lo = max(1, dil * (k - 1) + 1 - 2 * p)
        i = draw(st.integers(lo, lo + (5 if d < 3 else 2)))
        ks.append(k), ss.append(s), ds.append(dil), ps.append(p), isz.append(i)
    padding = "same" if same else (ps[0] if draw(st.booleans()) else tuple(ps))
    if not same and draw(st.booleans()):
        padding = "valid"
        isz = [max(i, dl * (k - 1) + 1) for i, k, dl in zip(isz, ks, ds)]
    stride = ss[0] if len(set(ss)) == 1 and draw(st.booleans()) else tuple(ss)
    if isinstance(padding, int):
        isz = [max(i, dl * (k - 1) + 1 - 2 * padding) for i, k, dl in zip(isz, ks, ds)]
    dilation = tuple(ds)
    bias = draw(st.booleans())
    return dict(d=d, x=(n, g * e, *isz), w=(g * c, e, *ks), stride=stride, padding=padding,
                dilation=dilation, groups=g, bias=bias)
