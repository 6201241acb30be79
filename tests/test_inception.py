"""Our FID Inception-v3 against torch-fidelity's (the network behind the usual FID / IS numbers).

torch-fidelity cannot be a test dependency (its wheel requires torchvision, which pins a CUDA torch),
so its source comes from an installed copy or from `pip download --no-deps torch-fidelity==0.4.0`
(the CI tier has the package registry); offline, the cross-checks skip and say why. Same random
weights (the weight file's layout, written with torch.save and read by both), same uint8 inputs.

Tolerance: both networks run the same torch ops in the same order in float32, so they agree bitwise
on the machine where this was written (max abs diff 0.0). The bound allows what may legitimately
differ on another CPU / BLAS: the convolution algorithm picked for each call (summation order),
whose relative error through 94 conv layers stays ~1e-6; 1e-5 of the output's scale covers it.
"""
import pytest
import torch
import torch.nn.functional as F

from sfd_fast.evaluation.inception import (FIDInceptionV3, expected_keys, load_inception, read_inception_weights,
                                           resize_bilinear_tf1)

from .inception_helpers import (random_inception_state, save_random_inception, torch_fidelity_inception_class,
                                torch_fidelity_source)


@pytest.fixture(scope="session")
def tf_src(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # pytest's cache dir keeps the download between runs
    src = torch_fidelity_source(cache.mkdir("torch-fidelity-0.4.0") if cache else tmp_path_factory.mktemp("tf"))
    if src is None:
        pytest.skip("torch-fidelity 0.4.0's source is not available (not installed, and `pip download --no-deps "
                    "torch-fidelity==0.4.0` failed: offline?); the cross-check against it did not run")
    return src


def _close(ours, ref, what):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g}, max rel diff {diff / scale:.3g} (scale {scale:.3g})")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)
    return diff


def test_weight_layout_is_torch_fidelitys():
    keys = expected_keys()
    # 94 conv+BN units (5 stem + 3x7 A + 4 B + 4x10 C + 6 D + 2x9 E) with 5 tensors each, + fc weight and bias
    assert len(keys) == 94 * 5 + 2
    assert keys["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert keys["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert keys["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert keys["fc.weight"] == (1008, 2048) and keys["fc.bias"] == (1008,)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 64, 64), (1, 3, 37, 45), (1, 3, 500, 333)])
def test_resize_matches_torch_fidelitys_tf1_resize(tf_src, shape):
    import importlib.util
    spec = importlib.util.spec_from_file_location("tf_resize", tf_src / "interpolate_compat_tensorflow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(shape[2]), dtype=torch.uint8).float()
    ref = mod.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    ours = resize_bilinear_tf1(x, 299)
    # same float32 ops in the same order: one ulp at 255 is 1.5e-5, so 1e-4 is a few ulps
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    # teeth: torch's own bilinear resize (half-pixel centres) is a different function
    assert (F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - ref).abs().max() > 1.0


def test_resize_of_a_299_image_is_the_identity():
    x = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8).float()
    assert torch.equal(resize_bilinear_tf1(x, 299), x)


@pytest.mark.parametrize("seed, batches", [(0, [(3, 32, 32), (1, 299, 299)]), (1, [(2, 37, 45), (1, 64, 64)])])
def test_network_matches_torch_fidelitys(tf_src, tmp_path, seed, batches):
    ref_cls = torch_fidelity_inception_class(tf_src)
    path = save_random_inception(tmp_path / "w.pth", seed)
    ref = ref_cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    ours = load_inception(path)
    g = torch.Generator().manual_seed(100 + seed)
    for n, h, w in batches:
        x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            ref_pool, ref_logits = ref(x)
            pool, logits = ours(x)
        assert pool.shape == (n, 2048) and logits.shape == (n, 1008) and pool.dtype == torch.float32
        assert ref_pool.std() > 0.1 and ref_logits.std() > 0.1  # the random weights do not collapse the signal
        _close(pool, ref_pool, f"seed {seed} {n}x{h}x{w} pool")
        _close(logits, ref_logits, f"seed {seed} {n}x{h}x{w} logits_unbiased")
    # teeth: the TF graph's quirks are exercised (average- instead of max-pooling in Mixed_7c changes features)
    ours.Mixed_7c.max_pool = False
    with torch.no_grad():
        assert (ours(x)[0] - ref_pool).abs().max() > 1e-2 * ref_pool.abs().max()


def test_bad_weight_files_name_the_problem(tmp_path):
    what = "ddpm.inception_weights"
    with pytest.raises(ValueError, match="ddpm.inception_weights: .*nope.pth does not exist; give torch-fidelity's "
                                         "weights-inception-2015-12-05-6726825d.pth"):
        read_inception_weights(tmp_path / "nope.pth", what)
    state = random_inception_state(0)
    del state["Mixed_5b.branch1x1.bn.running_mean"]
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="missing 'Mixed_5b.branch1x1.bn.running_mean'; 1 missing, 1 unexpected"):
        read_inception_weights(tmp_path / "missing.pth", what)
    state = random_inception_state(0)
    state["torchvision.extra"] = torch.zeros(1)
    torch.save(state, str(tmp_path / "extra.pth"))
    with pytest.raises(ValueError, match="unexpected 'torchvision.extra'"):
        read_inception_weights(tmp_path / "extra.pth", what)
    state = random_inception_state(0)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the TF graph's 1008
    torch.save(state, str(tmp_path / "shape.pth"))
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"):
        read_inception_weights(tmp_path / "shape.pth", what)
    torch.save([1, 2], str(tmp_path / "list.pth"))
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        read_inception_weights(tmp_path / "list.pth", what)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a state dict readable with weights_only=True"):
        read_inception_weights(tmp_path / "junk.pth", what)


def test_bn_counters_are_optional_and_input_must_be_uint8(tmp_path):
    state = FIDInceptionV3().state_dict()  # with num_batches_tracked, as a torch.save of the module would be
    torch.save(state, str(tmp_path / "w.pth"))
    net = load_inception(tmp_path / "w.pth")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="takes uint8 RGB images"):
        net(torch.rand(1, 3, 32, 32))
