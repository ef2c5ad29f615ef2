import torch

import ntkscope as nk


def test_exact_trace_matches_jacrev():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)).reshape(-1))(params)
    J = torch.cat([v.reshape(12, -1) for v in jac.values()], 1).detach()
    est = nk.trace(nk.NTK(model, X), method="exact")
    assert abs(est.value - float((J**2).sum())) < 1e-9 * est.value
