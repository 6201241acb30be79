"""The safe EDM / SiD snapshot reader (sfd_fast/edm/unpickle.py, snapshot.py).

Snapshots are built in the test from the torch_utils.persistence record structure
(tests/edm_helpers.write_snapshot), with no EDM code: a pickle {"ema": record, ...} as EDM's and SiD's
network-snapshot-*.pkl, and a torch.save archive as SiD's training-state-*.pt.
"""
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sfd_fast.edm import SnapshotError, load_snapshot
from sfd_fast.edm.record_pickle import PERSISTENCE_VERSION, dump_records, records_of
from sfd_fast.edm.unpickle import PersistentRecord, placeholder
from tests.edm_helpers import ADM, NCSNPP, easydict, tiny_vp, write_snapshot

ROOT = Path(__file__).resolve().parents[1]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _numpy_scalar():
    """numpy.float64(sqrt(0.5)) as a pickle names it (EDM's UNetBlock.skip_scale): an inert record here."""
    cls = placeholder("numpy.core.multiarray", "scalar")
    obj = cls(placeholder("numpy", "dtype")("f8", False, True), b"\xcd;\x7ff\x9e\xa0\xe6?")
    return obj


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_edm_network_snapshot_loads_into_the_right_architecture(tmp_path, arch):
    from tests.edm_helpers import DDPMPP
    net, kw = tiny_vp({"ddpmpp": DDPMPP, "ncsnpp": NCSNPP, "adm": ADM}[arch], seed=3)
    rec = records_of(net, "raise SystemExit('the embedded source must never run')", kw)
    # the other entries of EDM's snapshot: loss_fn and augment_pipe records, dataset_kwargs (EasyDict)
    extra = PersistentRecord(dict(type="class", version=6, module_src="raise SystemExit", class_name="AugmentPipe",
                                  state={"p": 0.12, "scale": _numpy_scalar()}))
    path = write_snapshot(tmp_path / "network-snapshot-000000.pkl",
                          {"ema": rec, "loss_fn": extra, "augment_pipe": extra,
                           "dataset_kwargs": easydict(path="cifar10-32x32.zip", use_labels=True)})
    loaded = load_snapshot(path)          # entry "ema" by default
    assert type(loaded).__name__ == "VPPrecond" and type(loaded.model).__name__ == type(net.model).__name__
    _same_weights(net, loaded)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
    labels = torch.eye(10)[:2]
    torch.testing.assert_close(loaded(x, s, labels), net.eval()(x, s, labels), rtol=0, atol=0)


def test_sid_training_state_archive_entries(tmp_path):
    """SiD's training-state-*.pt: a torch.save zip of fake_score / G / G_ema (and optimiser states)."""
    nets = {name: tiny_vp(seed=i)[0] for i, name in enumerate(("fake_score", "G", "G_ema"))}
    kw = tiny_vp()[1]
    entries = {name: records_of(n, "# EDM source", kw) for name, n in nets.items()}
    entries["g_optimizer_state"] = {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.0, 0.999)}]}
    path = write_snapshot(tmp_path / "training-state-000100.pt", entries, zip_archive=True)
    for name, net in nets.items():
        _same_weights(net, load_snapshot(path, entry=name))
    with pytest.raises(SnapshotError, match="no entry 'ema'; entries: fake_score, G, G_ema, g_optimizer_state"):
        load_snapshot(path)
    with pytest.raises(SnapshotError, match="g_optimizer_state.*is a dict, not an EDM network record"):
        load_snapshot(path, entry="g_optimizer_state")


def _malicious(tmp_path, class_name="VPPrecond"):
    marker = tmp_path / "pwned.txt"
    src = f"open({str(marker)!r}, 'w').write('embedded code ran')\n"
    net, kw = tiny_vp(seed=1)
    rec = records_of(net, src, kw)
    rec.meta["class_name"] = rec.class_name = class_name
    return net, marker, write_snapshot(tmp_path / "evil.pkl", {"ema": rec})


def test_malicious_embedded_source_is_never_executed(tmp_path):
    net, marker, path = _malicious(tmp_path)
    loaded = load_snapshot(path)       # the weights are read; the source that would write a file is not run
    _same_weights(net, loaded)
    assert not marker.exists()
    # the same file under a loader that does what torch_utils.persistence does (exec the source):
    # the file IS written, so the test above would have caught a reader that runs embedded code
    fake = tmp_path / "fake_edm" / "torch_utils"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "persistence.py").write_text(textwrap.dedent("""
        import types
        def _reconstruct_persistent_obj(meta):
            module = types.ModuleType("embedded")
            exec(meta["module_src"], module.__dict__)
            return meta
    """))
    code = f"import pickle, sys; sys.path.insert(0, {str(fake.parent)!r}); pickle.load(open({str(path)!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert marker.read_text() == "embedded code ran"


def test_unknown_class_is_refused_and_not_run(tmp_path):
    _, marker, path = _malicious(tmp_path, class_name="EvilNet")
    with pytest.raises(SnapshotError, match=r"network class 'EvilNet' is not supported.*supported: VPPrecond"):
        load_snapshot(path)
    assert not marker.exists()


def test_plain_pickle_globals_are_never_called(tmp_path):
    """A pickle that calls os.system / builtins.exec at load time: inert records, then a clear error."""
    marker = tmp_path / "pwned.txt"

    class Call:
        def __init__(self, module, name, *args):
            self.module, self.name, self.args = module, name, args

        def __reduce__(self):
            return placeholder(self.module, self.name), self.args
    for module, name, arg in (("os", "system", f"touch {marker}"),
                              ("builtins", "exec", f"open({str(marker)!r}, 'w').write('x')"),
                              ("builtins", "eval", f"open({str(marker)!r}, 'w').write('x')")):
        path = tmp_path / f"{name}.pkl"
        with open(path, "wb") as f:
            dump_records({"ema": Call(module, name, arg)}, f)
        with pytest.raises(SnapshotError, match=rf"\['ema'\] is a {module}.{name} object, not an EDM network record"):
            load_snapshot(path)
        assert not marker.exists()


def test_bad_snapshots_get_clear_errors(tmp_path):
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshot(tmp_path / "missing.pkl")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(SnapshotError, match="junk.pkl: not a readable snapshot pickle"):
        load_snapshot(junk)
    net, kw = tiny_vp()
    # weights that do not fit the recorded constructor arguments
    rec = records_of(net, "#", dict(kw, model_channels=32))
    path = write_snapshot(tmp_path / "mismatch.pkl", {"ema": rec})
    with pytest.raises(SnapshotError, match=r"mismatch.pkl\['ema'\]: .*has shape"):
        load_snapshot(path)
    # an unsupported constructor argument, and a non-plain one
    rec = records_of(net, "#", dict(kw, use_xformers=True))
    with pytest.raises(SnapshotError, match="constructor argument 'use_xformers' is not supported"):
        load_snapshot(write_snapshot(tmp_path / "arg.pkl", {"ema": rec}))
    rec = records_of(net, "#", dict(kw, beta_d=_numpy_scalar()))
    with pytest.raises(SnapshotError, match=r"init_kwargs.beta_d is a numpy.core.multiarray.scalar object, not plain data"):
        load_snapshot(write_snapshot(tmp_path / "np.pkl", {"ema": rec}))
    rec = records_of(net, "#", kw)
    rec.meta["type"] = rec.type = "function"
    with pytest.raises(SnapshotError, match="record of type 'function'"):
        load_snapshot(write_snapshot(tmp_path / "fn.pkl", {"ema": rec}))
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(SnapshotError, match="is a list, not a dict of entries"):
        load_snapshot(tmp_path / "list.pkl")


def test_records_revive_under_a_persistence_style_loader(tmp_path):
    """The record form we write is what torch_utils.persistence revives: a loader that execs the
    module source, takes the class by name and restores the instance dict gets a working network
    with the same outputs (the source here imports our classes, which carry EDM's names)."""
    net, kw = tiny_vp(NCSNPP, seed=5)
    src = "from sfd_fast.edm.layers import *\nfrom sfd_fast.edm.unets import *\nfrom sfd_fast.edm.precond import *\n"
    path = write_snapshot(tmp_path / "export.pkl", {"ema": records_of(net, src, kw)})
    fake = tmp_path / "loader" / "torch_utils"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "persistence.py").write_text(textwrap.dedent("""
        import types
        _modules = {}
        def _reconstruct_persistent_obj(meta):
            assert meta["type"] == "class" and meta["version"] == %d
            module = _modules.get(meta["module_src"])
            if module is None:
                module = _modules[meta["module_src"]] = types.ModuleType("embedded")
                exec(meta["module_src"], module.__dict__)
            cls = module.__dict__[meta["class_name"]]
            obj = cls.__new__(cls)
            obj.__setstate__(dict(meta["state"]))
            return obj
    """ % PERSISTENCE_VERSION))
    out = tmp_path / "out.pt"
    code = textwrap.dedent(f"""
        import pickle, sys, torch
        sys.path.insert(0, {str(fake.parent)!r})
        net = pickle.load(open({str(path)!r}, "rb"))["ema"]
        torch.manual_seed(0)
        x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
        torch.save(net.eval()(x, s, torch.eye(10)[:2]), {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    torch.manual_seed(0)
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
    torch.testing.assert_close(torch.load(out), net.eval()(x, s, torch.eye(10)[:2]), rtol=0, atol=0)


def test_safetensors_export_round_trip(tmp_path):
    from sfd_fast.edm.snapshot import write_safetensors
    net, kw = tiny_vp(ADM, seed=2)
    path = write_safetensors(net, "training.networks.VPPrecond", kw, tmp_path / "g.safetensors")
    _same_weights(net, load_snapshot(path))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SnapshotError, match="without 'edm.class_name'"):
        load_snapshot(tmp_path / "plain.safetensors")
