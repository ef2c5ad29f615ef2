"""Command line (placeholder until the CLI issue lands)."""

import typer

app = typer.Typer(help="Measure the empirical NTK of PyTorch models without forming it.")


@app.command()
def run() -> None:
    """Run the built-in demo."""
    import torch

    import ntkscope as nk
    from ntkscope import tasks

    X, y, _, _ = tasks.digits(200)
    model = tasks.mlp([64, 64, 10])
    K = nk.NTK(model, X)
    for f in (nk.trace, nk.frobenius_norm, nk.effective_rank):
        print(f(K, seed=0))
    print(nk.target_alignment(K, y, seed=0))
    del torch


def main() -> None:
    app()
