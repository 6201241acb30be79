"""sfd_fast.compat.checkpoints: reference pickles -> safetensors / diffusers, only with trust_pickle.

Round trip: a tiny network pickled in the reference's snapshot form {"ema": module} and the
training-state form (torch.save of modules + optimizer states) is converted, loaded back from the
safetensors (or diffusers) files into a fresh network, and must reproduce the original's state
tensors exactly (a conversion copies bits; any difference is a bug, so the comparison is exact).
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sfd_fast.compat.checkpoints import (convert_reference_checkpoint, load_reference_snapshot,
                                         load_reference_training_state)


class TinyNet(nn.Module):  # importable by pickle as tests.test_compat_checkpoints.TinyNet
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)  # a buffer-carrying module (running stats)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=16)


def assert_same_state(state, module):
    expected = module.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_snapshot_round_trip_safetensors_and_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = tiny_unet()
    pkl = tmp_path / "network-snapshot-1.000000-000100.pkl"
    pkl.write_bytes(pickle.dumps({"ema": unet}))

    st = convert_reference_checkpoint(pkl, tmp_path / "g.safetensors", trust_pickle=True)
    assert_same_state(load_file(str(st)), unet)
    fresh = UNet2DConditionModel.from_config(unet.config)
    fresh.load_state_dict(load_file(str(st)))
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, emb).sample, unet(x, t, emb).sample, rtol=0, atol=0)

    folder = convert_reference_checkpoint(pkl, tmp_path / "g_diffusers", trust_pickle=True, to="diffusers")
    assert_same_state(UNet2DConditionModel.from_pretrained(folder).state_dict(), unet)
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary left behind


def test_plain_module_snapshot(tmp_path):
    net = TinyNet()
    net.norm.running_mean.fill_(0.25)
    pkl = tmp_path / "edm.pkl"
    pkl.write_bytes(pickle.dumps({"ema": net}))
    assert_same_state(load_reference_snapshot(pkl, trust_pickle=True).state_dict(), net)
    out = convert_reference_checkpoint(pkl, tmp_path / "edm.safetensors", trust_pickle=True)
    assert_same_state(load_file(str(out)), net)
    with pytest.raises(ValueError, match="not a diffusers model"):
        convert_reference_checkpoint(pkl, tmp_path / "edm_dir", trust_pickle=True, to="diffusers")


@pytest.mark.parametrize("separate_ema", [False, True])
def test_training_state_round_trip(tmp_path, separate_ema):
    fake, gen = TinyNet(), TinyNet()
    ema = TinyNet() if separate_ema else gen
    opts = {}
    for name, net in (("fake", fake), ("g", gen)):
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opts[name] = opt
    path = tmp_path / "training-state-000005.pt"
    torch.save(dict(fake_score=fake, G=gen, G_ema=ema, fake_score_optimizer_state=opts["fake"].state_dict(),
                    g_optimizer_state=opts["g"].state_dict()), path)
    assert load_reference_training_state(path, trust_pickle=True)["G"].conv.weight.shape == (4, 3, 3, 3)
    out = convert_reference_checkpoint(path, tmp_path / "converted", trust_pickle=True)
    assert_same_state(load_file(str(out / "generator.safetensors")), gen)
    assert_same_state(load_file(str(out / "fake_score.safetensors")), fake)
    assert (out / "generator_ema.safetensors").is_file() == separate_ema
    if separate_ema:
        assert_same_state(load_file(str(out / "generator_ema.safetensors")), ema)
    optim = load_file(str(out / "optim_generator.safetensors"))
    exp_avg = opts["g"].state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(optim["state.0.exp_avg"], exp_avg, rtol=0, atol=0)
    meta = json.loads((out / "reference_state.json").read_text())
    assert meta["optimizers"]["generator"]["param_groups"][0]["betas"] == [0.0, 0.999]
    assert meta["ema_is_generator"] == (not separate_ema)


def test_pickles_need_the_trust_flag(tmp_path):
    pkl = tmp_path / "snap.pkl"
    pkl.write_bytes(pickle.dumps({"ema": TinyNet()}))
    pt = tmp_path / "training-state-000001.pt"
    torch.save(dict(fake_score=TinyNet(), G=TinyNet()), pt)
    for fn, path in ((load_reference_snapshot, pkl), (load_reference_training_state, pt)):
        with pytest.raises(ValueError, match="trust_pickle=True.*unpickling executes code"):
            fn(path)
    with pytest.raises(ValueError, match="without trust_pickle=True"):
        convert_reference_checkpoint(pkl, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_files(tmp_path):
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"G": 1}))
    with pytest.raises(ValueError, match=r"expected a pickle of \{'ema': module\}"):
        load_reference_snapshot(wrong, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_snapshot(tmp_path / "missing.pkl", trust_pickle=True)
    (tmp_path / "taken.safetensors").write_text("x")
    with pytest.raises(FileExistsError, match="force=True"):
        convert_reference_checkpoint(wrong, tmp_path / "taken.safetensors", trust_pickle=True)
