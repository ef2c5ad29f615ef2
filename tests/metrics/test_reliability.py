"""Regressions of issue 13 ("no wrong answers, no hangs, bounded memory"), one test per defect.

Calls that hung on the old code run in a subprocess under a deadline, so a regression fails
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

import ntkscope as nk
from ntkscope.cli import plot
from ntkscope.estimators import exact as ex
from ntkscope.tasks import jacobian_with_spectrum

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _tiny(dtype: torch.dtype = torch.float64) -> nk.NTK:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    return nk.NTK(m, torch.randn(6, 5, dtype=dtype))  # D = 18, P = 75


def _python(code: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args: str, cwd: Path, timeout: float = 120) -> _Result:
    """The command line in-process (typer's runner: same exit codes and streams, no interpreter start-up)."""
    from typer.testing import CliRunner

    from ntkscope.cli.app import app

    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(old)
    return _Result(r.exit_code, r.stdout, r.stderr)


FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x - 1e8)  # needs float64: x - 1e8 is all rounding error in float32


    def make64():
        torch.manual_seed(0)
        return Shifted().double(), 1e8 + torch.randn(6, 5, dtype=torch.float64)


    def frozen():
        m = nn.Linear(4, 2)
        for p in m.parameters():
            p.requires_grad_(False)
        return m, torch.randn(3, 4)


    def small():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)), torch.randn(5, 4), torch.randint(0, 2, (5,))


    class Boom(nn.Linear):
        def forward(self, x):
            if x.shape[0] == 0:
                return super().forward(x)
            raise KeyError("the user's forward broke")


    def boom():
        return Boom(4, 2), torch.randn(3, 4)


    def gru():
        return nn.GRU(3, 4), torch.randn(5, 2, 3)  # returns (output, h_n): the factory must pick one
    """
)


@pytest.fixture()
def factories(tmp_path: Path) -> Path:
    p = tmp_path / "facts.py"
    p.write_text(FACTORIES)
    return p


# 1 -------------------------------------------------------------------------------------------
def test_cli_keeps_the_model_dtype(factories: Path, tmp_path: Path) -> None:
    r = _cli("estimate", "-m", f"{factories}:make64", "--method", "exact", "--metrics", "trace", "--json", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["results"][0]["metrics"][0]["estimate"]["value"]
    sys.path.insert(0, str(factories.parent))
    try:
        import facts  # type: ignore[import-not-found]

        model, x = facts.make64()
    finally:
        sys.path.remove(str(factories.parent))
        sys.modules.pop("facts", None)
    want = nk.trace(nk.NTK(model, x), method="exact").value  # 76.8: float32 would give 18
    assert got == pytest.approx(want, rel=1e-9)
    r = _cli("estimate", "-m", f"{factories}:make64", "--method", "exact", "--metrics", "trace", "--json", "-q",
             "--dtype", "float32", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr  # the explicit override still casts


# 2 (coverage near D: tests/metrics/test_coverage.py::test_trace_interval_coverage_across_budgets) ------
def test_xtrace_is_exact_once_its_budget_covers_the_exact_cost() -> None:
    K = _tiny()
    e = nk.trace(K, method="xtrace", num_probes=17, seed=0)  # 34 passes ≥ 18: exact costs less
    assert e.exact and e.stderr is None and e.value == pytest.approx(ex.exact_trace(K), rel=1e-12)
    assert e.passes <= 18 and e.info["requested_method"] == "xtrace"


def test_xtrace_error_is_a_jackknife_not_its_sample_spread() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(200, 300, torch.arange(1, 201, dtype=torch.float64) ** -1.0))
    truth = ex.exact_frobenius_sq(K) ** 0.5
    z = [abs(e.value - truth) / e.stderr for e in (nk.frobenius_norm(K, method="xtrace", num_probes=30, seed=s) for s in range(40))]
    assert sum(v < 2.3 for v in z) / len(z) >= 0.9  # the old error bar covered 0.60 here


# 3 -------------------------------------------------------------------------------------------
def test_top_eigenvalues_default_is_accurate_and_counts_its_passes() -> None:
    J = jacobian_with_spectrum(300, 400, torch.arange(1, 301, dtype=torch.float64) ** -1.0, seed=2)
    K = nk.NTK.from_jacobian(J)
    exact = torch.linalg.eigvalsh(J @ J.T).flip(0)[:5]
    top = nk.top_eigenvalues(K, k=5, seed=0)
    assert top.method == "rsvd"
    assert torch.all((top.values - exact).abs() <= 0.01 * exact)
    assert top.errors is not None and torch.all((top.values - exact).abs() <= top.errors + 1e-9)
    assert top.info["matvecs"] == top.passes // 2 > 0


# 4, 5 ------------------------------------------------------------------------------------------
def test_tolerance_switches_to_exact_instead_of_growing_the_gram() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(60, 90, torch.arange(1, 61, dtype=torch.float64) ** -1.0))
    e = nk.frobenius_norm(K, method="vjp", rtol=1e-3, seed=0)
    assert e.exact and e.converged is True and e.value == pytest.approx(ex.exact_frobenius_sq(K) ** 0.5, rel=1e-12)
    assert e.passes <= 3 * 60  # rounds stop once the next one would cost more than the exact 60 passes
    assert "exact value cost less" in e.info["adaptive"]["stop"]


def test_rtol_zero_is_rejected_or_bounded() -> None:
    r = _python(
        """
        import torch, ntkscope as nk
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        K = nk.NTK(m, torch.randn(6, 5))
        try:
            nk.trace(K, method="vjp", rtol=0)
        except ValueError as e:
            print("REFUSED", e)
        e = nk.trace(K, method="vjp", rtol=0, max_passes=500, seed=0)
        print("BOUNDED", e.passes)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "REFUSED" in r.stdout and "max_passes" in r.stdout
    assert int(r.stdout.split("BOUNDED")[1]) <= 500


def test_stored_products_have_a_memory_limit() -> None:
    """The one-sided products (m × P for VJPs) are kept, so their count is capped; the m × m probe
    Gram is not (it is swept in row blocks), so many probes of a small model are fine."""
    K = nk.NTK.from_jacobian(torch.randn(300, 20_000, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"keeps every probe's product \(m × P numbers\).*memory limit of 2500 probes"):
        nk.frobenius_norm(K, method="vjp", num_probes=3000, seed=0)
    # 5,000 probes (below D = 6,000, so no exact switch) of a P = 5 model: a 5,000² Gram is 200 MB
    small = nk.NTK.from_jacobian(torch.randn(6000, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    e = nk.frobenius_norm(small, method="vjp", num_probes=5000, seed=0)
    exact = nk.frobenius_norm(small, method="exact").value
    assert e.stderr is not None and abs(e.value - exact) <= 5 * e.stderr


# 6 -------------------------------------------------------------------------------------------
def test_absurd_budgets_are_refused_with_the_exact_cost() -> None:
    r = _python(
        """
        import torch, ntkscope as nk
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        try:
            nk.trace(nk.NTK(m, torch.randn(6, 5)), num_probes=10**12)
        except ValueError as e:
            print(e)
        """,
        timeout=60,
    )
    assert r.returncode == 0 and "exact value costs 3" in r.stdout, r.stdout + r.stderr  # 3 VJPs over 6 per-example blocks


def test_the_budget_guard_counts_what_a_probe_really_costs() -> None:
    """XTrace's ‖K‖² spends 4 passes per probe (two products of K): the guard against absurd
    budgets counts 4, not the 2 of its trace (30,000 probes passed it as 60,000 passes)."""
    torch.manual_seed(0)
    K = nk.NTK(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)), torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"would cost 1.2e\+05 AD passes.*at most 25000 probes"):
        nk.frobenius_norm(K, method="xtrace", num_probes=30_000)
    with pytest.raises(ValueError, match=r"would cost 1.2e\+05 AD passes.*at most 50000 probes"):
        nk.trace(K, method="xtrace", num_probes=60_000)


def test_a_kernel_against_itself_costs_one_kernel_and_keeps_max_passes() -> None:
    """alignment(K, K) (e.g. a monitor comparing a kernel with its unchanged self): the one-sided
    methods and Hutchinson multiply by K once per probe (they had computed it twice, spending 2× the
    passes their budget counted), Hutch++ counts its two sketches, and max_passes holds for all."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    K = nk.NTK(net, torch.randn(20, 5, dtype=torch.float64))
    for method, passes in (("jvp", (10, 0)), ("vjp", (0, 10)), ("hutchinson", (10, 10))):
        e = nk.alignment(K, K, method=method, num_probes=10, seed=0)
        assert (e.jvp_passes, e.vjp_passes) == passes and e.value == pytest.approx(1.0, abs=1e-12), (method, e)
    for method in ("jvp", "vjp", "hutchinson", "hutchpp", "xtrace", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nk.ConvergenceWarning)  # the tolerance is out of reach on purpose
            e = nk.alignment(K, K, method=method, max_passes=48, rtol=1e-9, seed=0)
        assert e.passes <= 48, (method, e)


# 7, 15 (chunk_size) ------------------------------------------------------------------------------
def test_empty_inputs_and_bad_chunk_sizes_are_named() -> None:
    with pytest.raises(ValueError, match="inputs are empty"):
        nk.NTK(torch.nn.Linear(5, 3), torch.randn(0, 5))
    K = _tiny()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_size"):
            nk.trace(K, method="vjp", num_probes=4, seed=0, chunk_size=bad)


# 8, 14 -----------------------------------------------------------------------------------------
def test_plot_refuses_files_that_are_not_track_csvs(tmp_path: Path) -> None:
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    for name in ("other.csv", "bin.csv"):
        r = _cli("plot", str(tmp_path / name), cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "not an ntkscope track CSV" in last


def _rows() -> list[dict]:
    return [
        {"step": s, "loss": 1.0 / (s + 1), "trace": 10.0 + s, "trace_stderr": 0.5, "effective_rank": 3.0, "effective_rank_stderr": 0.1,
         "method": "vjp", "passes": 32, "seconds": 0.1}
        for s in (0, 1, 2, 3)
    ]  # fmt: skip


def test_training_plots_say_what_the_bars_are_and_use_whole_steps(tmp_path: Path) -> None:
    fig = plot.training(_rows(), title="gru")
    assert isinstance(fig, Figure)
    title = fig.get_suptitle()
    assert "gru" in title and "±1 stderr" in title and "vjp" in title and "32 AD passes" in title
    for ax in fig.axes:
        if ax.get_visible():
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks)
    written = plot.training_pngs(_rows(), tmp_path / "run.png", title="gru")
    names = sorted(p.name for p in written)
    assert names == ["run.png", "run_effective_rank.png", "run_loss.png", "run_trace.png"]
    assert all(p.stat().st_size > 5000 for p in written)


# 9, 10, 15 (orthogonal, exact speed-up) ----------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--method", "bogus"], "unknown --method"),
        (["--probe-kind", "cauchy"], "unknown --probe-kind"),
        (["--rtol", "-1"], "--rtol"),
        (["--probe-kind", "orthogonal"], "trace only"),
        (["--model", "FACT:frozen"], "no trainable parameters"),
        (["--model", "FACT:gru"], "return {'model': m, 'inputs': x, 'output': 0}"),
        (["--method", "vjp_proj"], "trace only"),
        (["track", "--method", "bogus"], "unknown --method"),
        (["track", "--method", "jvp_proj"], "trace only"),
        (["track", "--optimizer", "rmsprop"], "unknown --optimizer"),
        (["track", "--init-scale", "0"], "--init-scale must be a finite number > 0"),
        (["track", "--lr", "nan"], "--lr must be a finite number > 0"),
        (["run", "--method", "bogus"], "unknown --method"),
        (["run", "--method", "vjp_proj"], "trace only"),
    ],
)
def test_usage_errors_exit_2_with_one_line(factories: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    """Every usage error exits 2 at once, before a model is loaded or trained (``run`` trains two)."""
    args = [a.replace("FACT", str(factories)) for a in args]
    command, args = (args[0], args[1:]) if args[0] in ("track", "run") else ("estimate", args)
    model = [] if "--model" in args or command == "run" else ["--model", f"{factories}:small"]
    r = _cli(command, *model, *args, "-q", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: ") and needle in last[0]
    assert "params=" not in r.stderr


def test_user_code_failure_exits_1_with_one_line(factories: Path, tmp_path: Path) -> None:
    r = _cli("estimate", "--model", f"{factories}:boom", "-q", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "the user's forward broke" in lines[0]


def test_orthogonal_probes_are_documented_and_exact_rows_show_no_speedup(factories: Path, tmp_path: Path) -> None:
    r = _cli("estimate", "--help", cwd=tmp_path)
    assert "orthogonal" in r.stdout
    r = _cli("estimate", "-m", f"{factories}:small", "--method", "exact", "--metrics", "trace", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0.0×" not in r.stdout
    r = _cli("estimate", "-m", f"{factories}:small", "--probe-kind", "orthogonal", "--metrics", "trace", "--method", "vjp",
             "-n", "4", "-q", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr


# 11 ------------------------------------------------------------------------------------------
def test_auto_stays_inside_its_pass_budget() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(96, 200, torch.arange(1, 97, dtype=torch.float64) ** -1.0))
    for budget in (40, 95):
        e = nk.trace(K, num_probes=budget, seed=0)
        assert e.passes <= budget, (budget, e.passes, e.info.get("reason"))
    assert nk.trace(K, num_probes=96, seed=0).exact
    e = nk.frobenius_norm(K, rtol=0.02, seed=0)  # a tolerance: never more than a round past the exact cost
    assert e.passes <= 3 * 96


# 13 ------------------------------------------------------------------------------------------
def test_effective_rank_xtrace_shares_its_probes() -> None:
    K = nk.NTK.from_jacobian(jacobian_with_spectrum(200, 300, torch.arange(1, 201, dtype=torch.float64) ** -1.0))
    e = nk.effective_rank(K, method="xtrace", num_probes=16, seed=0)
    assert (e.jvp_passes, e.vjp_passes) == (32, 32)  # KΩ and K(KΩ): 2 × 16 K-products, not 3 × 16
    truth = ex.exact_trace(K) ** 2 / ex.exact_frobenius_sq(K)
    assert abs(e.value - truth) <= 5 * e.stderr


# 15 (README LSTM line) ------------------------------------------------------------------------------
def test_readme_lstm_line_shows_the_paths_that_ran() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "LSTM(10, 16)" in ln)
    torch.manual_seed(0)
    x = torch.randn(30, 8, 10)
    out: dict = {}
    exec(line.replace("print(", "out['v'] = ("), {"nk": nk, "torch": torch, "x": x, "out": out})
    assert isinstance(out["v"], dict) and out["v"] and all(v is not None for v in out["v"].values())


# -- a new user's session (stop 20): each of these was wrong or unclear before -------------------


class _TwoNames(torch.nn.Module):
    """One Linear registered under two attribute names (``self.a is self.b``)."""

    def __init__(self) -> None:
        super().__init__()
        lin = torch.nn.Linear(5, 5)
        self.a = lin
        self.b = lin
        self.c = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.sin(self.a(x)))))


def test_a_module_under_two_names_keeps_its_parameters_and_trains() -> None:
    torch.manual_seed(0)
    model = _TwoNames().double()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 5, dtype=torch.float64)
    K = nk.NTK(model, x)
    for method in ("jvp", "vjp", "exact"):
        nk.trace(K, method=method, num_probes=8, seed=0)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys()
    assert all(after[n] is p and isinstance(p, torch.nn.Parameter) and p.requires_grad for n, p in before.items())
    w = model.a.weight.detach().clone()
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(model.a.weight.detach(), w)  # the optimizer still trains the shared layer


def test_hidden_ntk_of_a_submodule_behind_train_mode_batchnorm() -> None:
    """``hidden_ntk(..., submodule=)`` runs on the analysis copy: batch statistics, no running
    stats moved, no hooks left on the user's modules; every mode agrees with the exact trace."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.rnn, self.out = torch.nn.BatchNorm1d(3), torch.nn.GRU(3, 5, batch_first=True), torch.nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(self.bn(x.transpose(1, 2)).transpose(1, 2))[0])

    torch.manual_seed(0)
    net = Net().double().train()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    stats = [t.clone() for t in net.bn.buffers()]
    K = nk.hidden_ntk(net, x, submodule="rnn")
    exact = nk.trace(K, method="exact")
    for method in ("jvp", "vjp"):
        m = (K.dim if method == "vjp" else K.num_params) - 1  # below the exact cost on that side
        e = nk.trace(K, method=method, num_probes=m, seed=1)
        assert e.stderr is not None and abs(e.value - exact.value) < 4 * e.stderr, (method, e, exact)
    assert all(torch.equal(a, b) for a, b in zip(stats, net.bn.buffers()))
    assert not net.rnn._forward_hooks and not net.rnn._forward_pre_hooks
    # batch statistics: the same GRU in eval mode (running stats at their defaults) differs
    eval_exact = nk.trace(nk.hidden_ntk(net.eval(), x, submodule="rnn"), method="exact")
    assert abs(eval_exact.value - exact.value) > 1e-3 * exact.value


def test_targets_must_have_the_state_shape_not_just_its_size() -> None:
    K = _tiny()  # state (6, 3)
    y = torch.randn(6, 3, dtype=torch.float64)
    a = nk.target_alignment(K, y, method="exact").value
    assert nk.target_alignment(K, y.reshape(-1), method="exact").value == pytest.approx(a, rel=1e-12)
    assert nk.target_alignment(K, y[:, :, None], method="exact").value == pytest.approx(a, rel=1e-12)
    with pytest.raises(ValueError, match=r"targets of shape \(3, 6\) do not match the state of shape \(6, 3\)"):
        nk.target_alignment(K, y.T, method="exact")
    # one logit per example: integer 0/1 labels cannot be one-hot over it (was "labels must lie in [0, 1)")
    torch.manual_seed(0)
    binary = nk.NTK(torch.nn.Linear(5, 1).double(), torch.randn(6, 5, dtype=torch.float64))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"cannot be one-hot encoded over a state of shape \(6, 1\).*y.float\(\)"):
        nk.target_alignment(binary, labels, method="exact")
    assert 0 < nk.target_alignment(binary, 2 * labels.double() - 1, method="exact").value <= 1


def test_inputs_that_require_grad_are_detached() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    K = nk.NTK(model, x * 2)  # a non-leaf with a graph back to x
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = nk.trace(K, method="jvp", num_probes=20, seed=0)
    assert not K.state.requires_grad and x.grad is None
    assert e.value == nk.trace(nk.NTK(model, (x * 2).detach()), method="jvp", num_probes=20, seed=0).value


def test_an_output_index_on_a_single_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match=r"output=0 indexes a tuple or list .* one tensor of shape \(4, 2\)"):
        nk.NTK(torch.nn.Linear(3, 2), torch.randn(4, 3), output=0)


def test_no_forward_mode_says_so_in_one_line_and_names_the_way_out() -> None:
    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e, self.o = torch.nn.EmbeddingBag(10, 4), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(self.e(x))

    torch.manual_seed(0)
    K = nk.NTK(Bag().double(), torch.randint(0, 10, (3, 5)))
    with pytest.raises(RuntimeError) as info:
        nk.trace(K, method="jvp", num_probes=4, seed=0)
    first, *rest = str(info.value).splitlines()
    assert "_embedding_bag" in first and "method='vjp'" in first
    assert len([line for line in rest if line.startswith("  ")]) == 2  # 7 paths, 2 distinct errors
    assert nk.trace(K, method="vjp", num_probes=4, seed=0).value > 0


def test_model_files_import_as_modules_and_track_makes_its_directory(tmp_path: Path) -> None:
    """A model file with ``from __future__ import annotations`` and a dataclass (which looks its
    module up in ``sys.modules``) loads; ``track --out runs/x.csv`` creates ``runs/``; a resumed
    run refuses a different ``--method`` instead of dropping it."""
    (tmp_path / "m.py").write_text(
        textwrap.dedent(
            """
            from __future__ import annotations
            import dataclasses
            import torch


            @dataclasses.dataclass
            class Config:
                width: int = 6


            def make():
                torch.manual_seed(0)
                net = torch.nn.Sequential(torch.nn.Linear(4, Config().width), torch.nn.Tanh(), torch.nn.Linear(Config().width, 2))
                return net, torch.randn(5, 4), torch.randint(0, 2, (5,))
            """
        )
    )
    r = _cli("estimate", "-m", f"{tmp_path / 'm.py'}:make", "--method", "exact", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    common = ("-m", f"{tmp_path / 'm.py'}:make", "--out", "runs/x.csv", "--every", "2", "-n", "4", "-q", "--no-plots")
    r = _cli("track", *common, "--steps", "2", "--method", "vjp", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "x.csv").is_file()
    r = _cli("track", *common, "--steps", "4", "--method", "hutchpp", "--resume", cwd=tmp_path)
    assert r.returncode == 2 and "method: interrupted run 'vjp', now 'hutchpp'" in r.stderr, r.stderr
    assert _cli("--version", cwd=tmp_path).stdout.startswith("ntkscope ")


def test_hidden_ntk_of_a_submodule_counts_only_the_parameters_that_move_it() -> None:
    """A readout after the recurrent submodule cannot move its states: by default it is not a
    parameter of the kernel (an explicit ``params=`` still takes it, with a zero block)."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.rnn, self.out = torch.nn.Linear(3, 3), torch.nn.GRU(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(self.enc(x))[0])

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    K = nk.hidden_ntk(net, x, submodule="rnn")
    assert [n.split(".")[0] for n in K.param_names] == ["enc"] * 2 + ["rnn"] * 4
    every = nk.hidden_ntk(net, x, submodule="rnn", params=[n for n, _ in net.named_parameters()])
    assert every.num_params == K.num_params + 10
    assert nk.trace(every, method="exact").value == pytest.approx(nk.trace(K, method="exact").value, rel=1e-12)


def test_hutchpp_and_xtrace_switch_to_exact_alike() -> None:
    """A budget that covers the exact cost buys the exact value, at the exact cost, for both."""
    K = _tiny()  # D = 18 < P = 75: the exact trace costs 3 VJPs, over its 6 per-example blocks of 3 outputs
    truth = nk.trace(K, method="exact")
    for method in ("hutchpp", "xtrace"):
        e = nk.trace(K, method=method, num_probes=200, seed=0)
        assert e.exact and e.stderr is None and e.passes == truth.passes == 3, (method, e)
        assert e.value == pytest.approx(truth.value, rel=1e-12)
    assert not nk.trace(K, method="hutchpp", num_probes=8, seed=0).exact  # 16 passes < 18


def test_exact_costs_one_jacobian_and_budgets_above_it_run_exact() -> None:
    """The exact value costs min(D, P) passes per kernel, however many components it needs
    (effective rank spent 2×, alignment 4×); a fixed budget at or above the exact cost of the
    method's own side returns the exact value, in that side's AD mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)  # D = 18, P = 75
    K = nk.NTK(net, x, ghost=False)  # no per-example blocks (whose exact trace costs 3 VJPs: test_example_blocks)
    K2 = nk.NTK(net, x, params={n: p.detach() * 1.1 for n, p in net.named_parameters()}, ghost=False)
    y = torch.randn(6, 3, dtype=torch.float64)
    for e in (nk.effective_rank(K, method="exact"), nk.frobenius_norm(K, method="exact"), nk.target_alignment(K, y, method="exact")):
        assert (e.jvp_passes, e.vjp_passes) == (0, 18), e
    assert nk.alignment(K, K2, method="exact").passes == 36
    exact = nk.trace(K, method="exact").value
    below = nk.trace(K, method="vjp", num_probes=17, seed=0)
    assert not below.exact and below.vjp_passes == 17
    for method, m, passes in (("vjp", 18, (0, 18)), ("jvp", 75, (75, 0)), ("hutchinson", 9, (0, 18))):
        e = nk.trace(K, method=method, num_probes=m, seed=0)
        assert e.exact and e.stderr is None and (e.jvp_passes, e.vjp_passes) == passes, (method, e)
        assert e.value == pytest.approx(exact, rel=1e-12)
    r = nk.effective_rank(K, method="jvp", num_probes=80, seed=0)
    assert r.exact and (r.jvp_passes, r.vjp_passes) == (75, 0)
    assert r.value == pytest.approx(nk.effective_rank(K, method="exact").value, rel=1e-10)


def test_non_finite_products_raise_or_are_avoided_instead_of_hanging() -> None:
    """A stable-shift Nyström grew its shift forever on inf/nan products: top_eigenvalues, and
    auto's pilot sketch (the default nk.trace), hung on a model whose forward-mode derivative is
    infinite (sqrt at 0) while reverse mode is finite (QA repros)."""
    r = _python(
        """
        import math, torch, ntkscope as nk
        from ntkscope.metrics import spectrum as sp
        from ntkscope.tasks import jacobian_with_spectrum
        J = jacobian_with_spectrum(20, 30, torch.ones(20, dtype=torch.float64))
        J[0, 0] = math.inf
        K = nk.NTK.from_jacobian(J)
        for call in (lambda: sp.top_eigenvalues(K, k=3, method="nystrom", seed=0), lambda: nk.trace(K, method="xtrace", num_probes=8, seed=0)):
            try:
                call()
            except FloatingPointError as e:
                print("RAISED", "not finite" in str(e))
        torch.manual_seed(0)

        class Sqrt(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(10, 16), torch.nn.Linear(16, 3)

            def forward(self, x):
                return self.b(torch.relu(self.a(x)).sqrt())

        # ghost=False: no per-example blocks, whose exact trace (3 VJPs) auto would take without a pilot
        e = nk.trace(nk.NTK(Sqrt().double(), torch.randn(30, 10, dtype=torch.float64), ghost=False), num_probes=40, seed=0)
        print("AUTO", e.method, math.isfinite(e.value))
        """,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("RAISED True") == 2 and "AUTO vjp True" in r.stdout, r.stdout


def test_a_ddp_wrapped_model_with_buffers_is_analysed_and_monitored() -> None:
    r = _python(
        """
        import os, tempfile, torch, torch.distributed as dist, ntkscope as nk
        fd, fn = tempfile.mkstemp(); os.close(fd)
        dist.init_process_group("gloo", init_method=f"file://{fn}", rank=0, world_size=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        X = torch.randn(6, 4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ref = nk.trace(nk.NTK(model, X), method="exact").value
        got = nk.trace(nk.NTK(ddp, X), method="exact").value
        rec = nk.Monitor(ddp, X, every=1, num_probes=8, loggers=()).step(0)
        print("SAME", abs(got - ref) <= 1e-5 * ref, "MONITOR", rec is not None)
        dist.destroy_process_group()
        """,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr
    assert "SAME True MONITOR True" in r.stdout, r.stdout + r.stderr


def test_exact_norms_and_sketching_methods_refuse_what_memory_cannot_hold() -> None:
    """method='exact' for a norm formed a D × P Jacobian past the library's own 2e8-number limit
    (3.5 GB here; at D = 20,000 it ran for minutes), and Hutch++/XTrace stored any number of
    D-vectors, while the one-sided methods refused (QA repros).  Nothing is computed here."""
    torch.manual_seed(0)
    wide = nk.NTK(torch.nn.Linear(1000, 500), torch.randn(1, 1000))  # D = 500, P = 500,500
    with pytest.raises(ValueError, match=r"would store a 500×500500 Jacobian .* the exact trace stores nothing"):
        nk.frobenius_norm(wide, method="exact")
    long = nk.NTK(torch.nn.Linear(1000, 500), torch.randn(400, 1000), ghost=False)  # D = 200,000; no per-example blocks (exact: 500 VJPs)
    for method in ("hutchpp", "xtrace"):
        with pytest.raises(ValueError, match=r"num_probes=60000 exceeds the memory limit of 250 probes"):
            nk.trace(long, method=method, num_probes=60000, seed=0)


def test_from_jacobian_names_what_it_needs() -> None:
    for J, error in ((torch.zeros(0, 3), ValueError), (torch.zeros(3, 0), ValueError), ("x", TypeError), ([[1.0]], TypeError)):
        with pytest.raises(error, match="a Jacobian must be a"):  # were torch.cat's and AttributeError's messages
            nk.NTK.from_jacobian(J)  # type: ignore[arg-type]
