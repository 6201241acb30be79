"""engine.compile_regions (sfd_fast/engine/regional.py): the repeated blocks are compiled, not the
whole network; instances of one block class at one shape share one graph; outputs equal eager.
Backend "eager" (Dynamo capture without code generation): graph counts and guards are the same as
Inductor's, in a fraction of the time."""
import pytest
import torch

from sfd_fast.config import Config
from sfd_fast.digits.model import DigitsEpsMLP
from sfd_fast.domains import validate_engine
from sfd_fast.engine.accelerate import compile_networks
from sfd_fast.engine.regional import compile_regions, region_modules


def test_regions_of_the_family_networks():
    from sfd_fast.ddpm.model import DDPMArch, DDPMUNet

    mlp = DigitsEpsMLP(10, hidden=32, blocks=3)
    assert [type(m).__name__ for m in region_modules(mlp)] == ["ResidualBlock"] * 3
    unet = DDPMUNet(DDPMArch(num_classes=10, image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                             attn_resolutions=[8], dropout=0.1))
    kinds = {type(m).__name__ for m in region_modules(unet)}
    assert kinds == {"ResnetBlock", "AttnBlock"}
    assert region_modules(torch.nn.Linear(3, 3)) == []


def test_blocks_share_one_graph_and_match_eager():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = DigitsEpsMLP(10, hidden=32, blocks=4)
    x, t, y = torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
    with torch.no_grad():
        ref = net(x, t, y)
        assert compile_regions(net, "eager") == 4
        got = net(x, t, y)
        net(x, t, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)   # backend eager: the same kernels
    # four ResidualBlock instances, one shape: one graph, reused (Dynamo inlines nn.Modules and
    # takes their parameters as inputs), and no recompile on the second call
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_compile_networks_uses_regions_when_asked():
    cfg = Config()
    cfg.engine.compile, cfg.engine.compile_regions = True, True
    net = DigitsEpsMLP(10, hidden=16, blocks=2)

    class D:  # a denoiser holds its backbone as .net
        pass

    d = D()
    d.net = net
    assert compile_networks([d], cfg.engine, backend="eager") == [net]
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in net.blocks)
    assert getattr(net, "_compiled_call_impl", None) is None   # the net itself stays eager glue


def test_compile_regions_needs_compile():
    cfg = Config()
    cfg.engine.compile_regions = True
    errors = []
    validate_engine(cfg, lambda field, msg: errors.append((field, msg)))
    assert errors and errors[0][0] == "engine.compile_regions" and "engine.compile=true" in errors[0][1]


def test_more_block_shapes_than_dynamos_default_limit():
    """Ten instances of one block class at ten widths: ten variants of one code object, past
    Dynamo's default recompile limit of 8 (what the tiny SD UNet hit in the device-check rehearsal);
    compile_regions raises the limit to its structural bound, so the forward compiles."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from sfd_fast.digits.model import ResidualBlock

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.widths = [8 + 4 * i for i in range(10)]
            self.blocks = torch.nn.ModuleList([ResidualBlock(w) for w in self.widths])

        def forward(self, x):
            return [b(x[..., :w], x[..., :w]) for b, w in zip(self.blocks, self.widths)]

    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        net = Stack()
        x = torch.randn(3, 48)
        with torch.no_grad():
            ref = net(x)
            compile_regions(net, "eager")
            got = net(x)
        assert torch._dynamo.config.recompile_limit >= 10
        assert counters["stats"]["unique_graphs"] == 10
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()
