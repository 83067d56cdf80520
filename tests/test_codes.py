"""SparseCodes: the padded and the ragged form are the same codes (values, gradients, order)."""

from __future__ import annotations

import torch

from sae.rundir.codes import SparseCodes


def _dense_ref(rows, lat, vals, B, F):
    out = torch.zeros(B, F, dtype=vals.dtype)
    for r, c, v in zip(rows.tolist(), lat.tolist(), vals.tolist(), strict=True):
        out[r, c] += v
    return out


def test_ragged_codes_pad_to_the_largest_row_and_keep_values_order_and_gradients() -> None:
    rows = torch.tensor([0, 0, 0, 2, 3, 3])
    lat = torch.tensor([1, 4, 7, 2, 0, 9])
    v = torch.tensor([0.5, 0.0, 2.0, 1.5, 0.25, 3.0], requires_grad=True)
    c = SparseCodes.ragged(rows, lat, v, batch=5)
    assert c.variable and c.batch == 5
    assert int(c.n_active()) == 5 and c.row_counts().tolist() == [3, 0, 1, 2, 0]
    assert torch.equal(c.to_dense(10).detach(), _dense_ref(rows, lat, v.detach(), 5, 10))
    assert c.idx.shape == (5, 3) and c.live.sum(1).tolist() == [3, 0, 1, 2, 0]
    assert torch.equal(c.idx[c.live], lat) and torch.equal(c.vals[c.live].detach(), v.detach())
    assert bool((c.vals[~c.live] == 0).all())
    (c.vals * torch.arange(15.0).view(5, 3)).sum().backward()  # padded vals stay in the graph
    assert v.grad.tolist() == [0.0, 1.0, 2.0, 6.0, 9.0, 10.0]  # slot positions row·3 + j of each entry


def test_padded_codes_flatten_in_row_major_order_with_and_without_live() -> None:
    vals = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 4.0]])
    idx = torch.tensor([[5, 1, 2], [0, 7, 3]])
    rows, lat, v = SparseCodes(vals, idx).entries()
    assert rows.tolist() == [0, 0, 0, 1, 1, 1] and lat.tolist() == [5, 1, 2, 0, 7, 3]
    assert not SparseCodes(vals, idx).variable and int(SparseCodes(vals, idx).n_active()) == 4
    live = torch.tensor([[True, False, True], [False, True, True]])
    c = SparseCodes(vals, idx, live=live)
    rows, lat, v = c.entries()
    assert rows.tolist() == [0, 0, 1, 1] and lat.tolist() == [5, 2, 7, 3] and v.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert c.row_counts().tolist() == [2, 2]
    assert torch.equal(c.to_dense(8), torch.zeros(2, 8).index_put_((torch.tensor([0, 0, 1, 1]), lat), v))
