"""Reference DDPM checkpoints (spec §4.1): both list layouts, entries, "module." prefix, refusal of
pickled objects, architecture mismatches, and the 6-entry export."""
import pytest
import torch

from sfd_fast.ddpm import load_reference_checkpoint
from sfd_fast.ddpm.checkpoints import (ReferenceCheckpointError, read_reference_list, save_reference_list,
                                       starting_states)

from .ddpm_helpers import base_list, prefixed, same_weights, save, sfd_list, tiny_arch, tiny_state
from .ddpm_reference_net import RefConditionalModel


def test_full_size_reference_state_dict_loads_with_public_signature(tmp_path):
    """Keys and shapes as the reference names them (from the independent transcription, ch 128,
    32 px), DDP prefix on the model entry only (the reference saves the EMA shadow without it)."""
    torch.manual_seed(0)
    ref = RefConditionalModel().eval()
    state = ref.state_dict()
    path = save(base_list(prefixed(state), state), tmp_path / "ckpt.pth")
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([440, 38]), torch.tensor([0, 7])
    with torch.no_grad():
        want = ref(x, t, y)
        for entry in ("ema", "model"):
            net = load_reference_checkpoint(str(path), entry=entry, image_size=32, num_classes=10)
            assert not net.training
            # 1e-5 relative: fp32 summation-order differences only (see test_ddpm_model.REL_TOL)
            assert ((net(x, t, y) - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("ddp", [False, True])
def test_entries_of_both_layouts(tmp_path, ddp):
    wrap = prefixed if ddp else (lambda s: s)
    model, ema, fake, gen = (tiny_state(s) for s in (1, 2, 3, 4))
    base = save(base_list(wrap(model), ema), tmp_path / "base.pth")
    sfd = save(sfd_list(wrap(fake), wrap(gen), ema), tmp_path / "sfd.pth")
    arch = tiny_arch()

    def load(p, e):
        return load_reference_checkpoint(p, entry=e, arch=arch)
    assert same_weights(load(base, "ema"), ema)
    assert same_weights(load(base, "model"), model)
    assert same_weights(load(base, "generator"), model)   # sample.py: [0] for a base list
    assert same_weights(load(base, "fake_score"), model)  # train_sfd without init_from_ema: [0]
    assert same_weights(load(sfd, "ema"), ema)
    assert same_weights(load(sfd, "generator"), gen)
    assert same_weights(load(sfd, "model"), gen)
    assert same_weights(load(sfd, "fake_score"), fake)


def test_starting_states_follow_init_from_ema(tmp_path):
    """Teacher = fake-score start; two-stage: teacher = the stage-1 fake score (spec §1a)."""
    model, ema, fake, gen = (tiny_state(s) for s in (1, 2, 3, 4))
    base = read_reference_list(save(base_list(model, ema), tmp_path / "b.pth"))
    sfd = read_reference_list(save(sfd_list(fake, gen, ema), tmp_path / "s.pth"))
    for states, flag, want_teacher, want_gen in ((base, True, ema, ema), (base, False, model, model),
                                                 (sfd, True, fake, ema), (sfd, False, fake, gen)):
        teacher, generator, _ = starting_states(states, flag, "ckpt")
        assert all(torch.equal(teacher[k], want_teacher[k]) for k in want_teacher)
        assert all(torch.equal(generator[k], want_gen[k]) for k in want_gen)


def test_early_stage_snapshot_and_bad_entry(tmp_path):
    s = tiny_state(0)
    early = sfd_list(s, s, s)
    early[0] = early[1] = early[3] = None
    path = save(early, tmp_path / "early.pth")
    assert same_weights(load_reference_checkpoint(path, "generator", arch=tiny_arch()), s)
    with pytest.raises(ReferenceCheckpointError, match="'fake_score' is empty"):
        load_reference_checkpoint(path, "fake_score", arch=tiny_arch())
    with pytest.raises(ReferenceCheckpointError, match="use one of ema, model"):
        load_reference_checkpoint(path, "teacher", arch=tiny_arch())


class NotATensor:
    pass


@pytest.mark.parametrize("payload", [[torch.nn.Linear(2, 2), {}, 0, {}], [NotATensor(), {}, 0, {}]])
def test_refuses_files_that_need_unpickling(tmp_path, payload):
    path = tmp_path / "pickled.pth"
    torch.save(payload, str(path))
    with pytest.raises(ReferenceCheckpointError, match="refused, it needs full unpickling"):
        load_reference_checkpoint(path, arch=tiny_arch())


def test_wrong_architecture_names_first_key_and_shape(tmp_path):
    s = tiny_state(0)
    path = save(base_list(s, s), tmp_path / "tiny.pth")
    with pytest.raises(ReferenceCheckpointError) as e:  # tiny weights into the 32 px ch 128 network
        load_reference_checkpoint(path, image_size=32)
    msg = str(e.value)
    assert "first shape mismatch 'null_classes_emb': checkpoint (32,) vs network (128,)" in msg
    assert "missing keys, first 'down.0.block.1.norm1.weight' (128,)" in msg
    s12 = tiny_state(0, num_classes=12)
    path = save(base_list(s12, s12), tmp_path / "c12.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"'classes_emb.weight': checkpoint \(12, 32\) vs network \(10, 32\)"):
        load_reference_checkpoint(path, arch=tiny_arch(10))
    extra = dict(s, **{"logvar": torch.zeros(1000)})  # the reference's "bayesian" model type
    path = save(base_list(extra, extra), tmp_path / "bayes.pth")
    with pytest.raises(ReferenceCheckpointError, match=r"1 unexpected keys, first 'logvar' \(1000,\)"):
        load_reference_checkpoint(path, arch=tiny_arch())


def test_not_a_reference_list(tmp_path):
    path = save({"model": tiny_state(0)}, tmp_path / "dict.pth")
    with pytest.raises(ReferenceCheckpointError, match="expected the reference DDPM list"):
        load_reference_checkpoint(path, arch=tiny_arch())
    with pytest.raises(ReferenceCheckpointError, match="does not exist"):
        load_reference_checkpoint(tmp_path / "missing.pth", arch=tiny_arch())


def test_export_writes_the_six_entry_list(tmp_path):
    fake, gen, ema = (tiny_state(s) for s in (1, 2, 3))
    out = tmp_path / "sub" / "ckpt-9.pth"
    save_reference_list(out, fake, gen, ema, 9)
    states = torch.load(str(out), weights_only=True)  # what the reference's torch.load reads
    assert len(states) == 6 and states[4] == 9
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp file left
    for entry, want in (("fake_score", fake), ("generator", gen), ("ema", ema)):
        assert same_weights(load_reference_checkpoint(out, entry, arch=tiny_arch()), want)
