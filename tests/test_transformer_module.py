"""Hessian blocks of an imported torch model (`tnderive.from_module` -> `nn.transformer.from_model`)
and `tnderive hessian-blocks --module`, against torch.func.hessian of the module itself."""
from __future__ import annotations

import textwrap

import pytest
import torch

import tnderive as tn
from tnderive.cli import main
from tnderive.draw import dot_available
from tnderive.errors import TNError
from tnderive.nn.transformer import from_model
from tests.cases.transformer_reference import torch_hessian

MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        """A pre-LN transformer block written by hand (LayerNorm, MultiheadAttention, GELU MLP)."""

        def __init__(self, d=4, heads=2, f=6):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.ln2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, f)
            self.fc2 = nn.Linear(f, d)

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.b0 = Block()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.b0(x))


    def factory():
        torch.manual_seed(0)
        return Net()
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "hb_toy_model.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import hb_toy_model
    return hb_toy_model


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_imported_model_blocks_match_torch_func(toy, loss):
    imported = tn.from_module(toy.factory().eval(), torch.randn(1, 3, 4))
    model = from_model(imported, loss=loss)
    T = model.random_inputs(seed=1)
    assert torch.equal(T["b0_fc1_weight"], toy.factory().b0.fc1.weight.double())  # its own values
    assert T["X"].shape == (1, 3, 4) and T["Y"].shape == (1, 3, 3)
    torch.testing.assert_close(tn.evaluate(tn.parse(model.text), **T), model.torch_loss(**T),
                               rtol=1e-12, atol=1e-12)
    blocks = tn.hessian_blocks(model, params=["*.in_proj_weight", "b0.ln1.weight", "b0.fc2.weight"])
    assert blocks.params == ("b0_ln1_weight", "b0_attn_in_proj_weight", "b0_fc2_weight")
    values = blocks.evaluate_parts(T)
    for (p, q), parts in values.items():
        H = torch_hessian(model, T, p, q)
        scale = max(H.abs().max().item(), 1e-3)
        assert (parts["total"] - H).abs().max().item() <= 1e-9 * scale, (p, q)
        assert (parts["outer"] + parts["functional"] - H).abs().max().item() <= 1e-9 * scale, (p, q)


def test_from_model_errors(toy):
    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a * b
    with pytest.raises(TNError, match="one input tensor"):
        from_model(tn.from_module(Two(), torch.randn(2, 3), torch.randn(2, 3)))
    with pytest.raises(TNError, match="loss must be"):
        from_model(tn.from_module(toy.factory().eval(), torch.randn(1, 3, 4)), loss="bce")


def test_cli_module_report_and_diagrams(toy, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["hessian-blocks", "--module", "hb_toy_model:factory", "--input-shape", "1,3,4",
                 "--params", "*.fc1.weight", "--no-slopes", "-q", "-o", str(out)])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "Net (imported)" in report and "b0.fc1.weight – b0.fc1.weight" in report
    if dot_available():
        svgs = sorted(p.name for p in (out / "diagrams").iterdir())
        assert svgs == ["b0.fc1.weight__b0.fc1.weight_functional.svg",
                        "b0.fc1.weight__b0.fc1.weight_outer.svg"]
        assert "<svg" in (out / "diagrams" / svgs[0]).read_text()
    capsys.readouterr()
    assert main(["hessian-blocks", "--module", "hb_toy_model:factory", "-o", str(out)]) == 2
    assert "--module needs --input-shape" in capsys.readouterr().err
    assert main(["hessian-blocks", "--module", "hb_toy_model:factory", "--input-shape", "1,3,4",
                 "--params", "*.q.weight", "-q", "-o", str(out)]) == 2
    assert "'*.q.weight' matches no parameter" in capsys.readouterr().err
