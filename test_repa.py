"""Tests for repa.py and sample.py: the second way to read the method.

Grouped like the file: interpolant -> model -> loss -> encoders. Each group says what it proves.
Golden numbers were captured by running the official code (sihyun-yu/REPA @ 67f7145) on the
same deterministic weights and inputs; only the numbers are kept here.
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import demo
import repa
import sample
from test_demo import DEMO_PY, demo_cache, run_demo  # noqa: F401 (demo_cache: autouse)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Interpolant: the target v of eq. (2) is the time derivative of the path x_t of eq. (1).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_velocity_is_time_derivative_of_path(path_type):
    x, eps = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.rand(5, 1, dtype=torch.float64).requires_grad_()
    alpha, sigma, d_alpha, d_sigma = repa.interpolant(t, path_type)
    x_t = alpha * x + sigma * eps
    dxdt = torch.stack([torch.autograd.grad(x_t[:, j].sum(), t, retain_graph=True)[0][:, 0]
                        for j in range(3)], dim=1)
    torch.testing.assert_close(dxdt, (d_alpha * x + d_sigma * eps).detach())


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_path_ends_are_data_and_noise(path_type):
    a0, s0, _, _ = repa.interpolant(torch.tensor(0.0), path_type)
    a1, s1, _, _ = repa.interpolant(torch.tensor(1.0), path_type)
    assert (a0.item(), s0.item()) == (1.0, 0.0)
    assert abs(a1.item()) < 1e-7 and s1.item() == 1.0


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_t_has_edm_noise_to_signal_ratio(path_type):
    torch.manual_seed(0)
    t = repa.sample_t(10_000, "lognormal", path_type).double()
    torch.manual_seed(0)
    sigma = torch.randn(10_000).exp().double()
    alpha_t, sigma_t, _, _ = repa.interpolant(t, path_type)
    torch.testing.assert_close(sigma_t / alpha_t, sigma, rtol=1e-4, atol=0)


def test_bad_path_and_weighting_are_user_errors():
    with pytest.raises(repa.UserError):
        repa.interpolant(torch.zeros(1), "edm")
    with pytest.raises(repa.UserError):
        repa.sample_t(2, "logit")


# ---------------------------------------------------------------------------------------------
# Model: adaLN-Zero outputs exactly 0 at init; sizes, key names and parameter counts are the
# official ones, so official checkpoints load strictly.
# ---------------------------------------------------------------------------------------------
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
            mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, encoder_depth=2,
            projector_dim=64)


def tiny_model(z_dims=(32,), **kw):
    return repa.SiT(**{**TINY, "z_dims": list(z_dims), **kw})


def fill_(model):
    """Deterministic weights, independent of any init code (the golden recipe)."""
    g = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    for k in sorted(sd):
        if k != "pos_embed":
            sd[k].copy_(torch.randn(sd[k].shape, generator=g) * 0.1)
    return model


def checks(x):
    f = x.double().flatten()
    w = torch.linspace(-1, 1, f.numel(), dtype=torch.float64)
    return [f.sum().item(), (f * f).sum().item(), (f * w).sum().item()] + f[:6].tolist()


def assert_golden(x, expected, tol=1e-5):
    got = checks(x)
    exp = [expected["sum"], expected["sumsq"], expected["wsum"]] + list(expected["first"])
    scale = max(1.0, math.sqrt(abs(exp[1])))
    for g, e in zip(got, exp):
        assert abs(g - e) <= tol * scale, (got, exp)


def test_model_outputs_zero_at_init():
    model = tiny_model()
    v, zs = model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 1000]))
    assert torch.count_nonzero(v) == 0
    assert zs[0].shape == (3, 16, 32) and zs[0].abs().sum() > 0  # the projector is not zeroed


def test_label_dropout_only_in_training_and_null_is_num_classes():
    model = fill_(tiny_model())
    x, t = torch.randn(64, 4, 8, 8), torch.rand(64)
    y = torch.randint(0, 1000, (64,))
    null = torch.full_like(y, 1000)
    model.eval()
    v_cond, v_null = model(x, t, y)[0], model(x, t, null)[0]
    assert torch.equal(model(x, t, y)[0], v_cond)  # eval: deterministic, no dropout
    model.train()
    torch.manual_seed(0)
    v_train = model(x, t, y)[0]
    dropped = [torch.equal(v_train[i], v_null[i]) for i in range(64)]
    kept = [torch.equal(v_train[i], v_cond[i]) for i in range(64)]
    assert all(d != k for d, k in zip(dropped, kept)) and 1 <= sum(dropped) <= 20


def test_without_label_dropout_there_is_no_null_row_as_in_the_official_code(tmp_path, capsys):
    model = tiny_model(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 1000  # strict-loads official ones
    save_ours(tmp_path / "nodrop.pt", class_dropout_prob=0.0)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "nodrop.pt"), "--cfg-scale", "2"])
    assert "no null label" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "nodrop.pt"), "--cfg-scale", "1",
                     "--cls-cfg-scale", "2"])
    assert "--cls-cfg-scale guides REG's class token, and this model has none" in \
        capsys.readouterr().err


def test_size_table_accepts_official_names():
    assert repa.size_config("SiT-XL/2") == repa.size_config("XL/2") == dict(
        depth=28, hidden_size=1152, num_heads=16, patch_size=2, encoder_depth=8)
    assert repa.SIZES["B/4"]["encoder_depth"] == 4 and repa.SIZES["L/8"]["patch_size"] == 8
    assert len(repa.SIZES) == 30  # T, S, B, L, XL x patch 2, 4, 8, as SiT and as DiT
    with pytest.raises(repa.UserError, match="unknown model size"):
        repa.size_config("XXL/2")


# (name, total parameters, projector parameters): FACTS.md, the official counts at 256 px
OFFICIAL_COUNTS = [("B/2", 137_845_008, 7_344_896), ("L/2", 465_955_600, 7_869_184),
                   ("XL/2", 683_242_512, 8_131_328)]


@pytest.mark.parametrize("name,total,proj", OFFICIAL_COUNTS)
def test_parameter_counts_equal_official(name, total, proj):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = repa.SiT(**repa.SIZES[name], input_size=32, num_classes=1000, z_dims=[768])
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.projectors.parameters()) == proj


def test_xl2_state_dict_keys_and_shapes_equal_official():
    with torch.device("meta"):
        model = repa.SiT(**repa.SIZES["XL/2"], input_size=32, num_classes=1000, z_dims=[768])
    sd = model.state_dict()
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sd.items())
    assert len(sd) == 298
    assert hashlib.sha256(lines.encode()).hexdigest() == GOLDEN["xl2_keys_sha256"]


def test_legacy_decoder_blocks_checkpoint_loads():
    model = fill_(tiny_model())
    legacy = {}  # the released XL/2 last.pt names blocks after encoder_depth decoder_blocks.N
    for k, v in model.state_dict().items():
        if k.startswith("blocks.") and int(k.split(".")[1]) >= TINY["encoder_depth"]:
            _, n, rest = k.split(".", 2)
            k = f"decoder_blocks.{int(n) - TINY['encoder_depth']}.{rest}"
        legacy[k] = v.clone()
    fresh = repa.load_sit_weights(tiny_model(), legacy)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_checkpoint_for_another_model_is_one_clear_line():
    other = tiny_model(hidden_size=32)
    with pytest.raises(repa.UserError) as e:
        repa.load_sit_weights(tiny_model(), other.state_dict())
    assert "\n" not in str(e.value) and "another size" in str(e.value)
    with pytest.raises(repa.UserError):
        repa.load_sit_weights(tiny_model(), tiny_model(z_dims=(32, 48)).state_dict())


class NotAPlainValue:
    pass


def test_a_checkpoint_that_only_code_could_load_says_why_not_to_run_it(tmp_path):
    torch.save({"model": NotAPlainValue()}, tmp_path / "code.pt")
    with pytest.raises(repa.UserError) as e:
        repa.load_checkpoint(str(tmp_path / "code.pt"))
    assert "only running code could rebuild" in str(e.value) and "NotAPlainValue" in str(e.value)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_corrupted_on_disk_is_one_clear_line(tmp_path):
    # torch.load does not check the archive's CRCs: bytes of 0xFF in a float32 tensor are NaN
    path = tmp_path / "flipped.pt"
    torch.save({"ema": tiny_model().state_dict()}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(repa.UserError, match="non-finite values in .*: it is corrupt"):
        repa.load_sit_weights(tiny_model(), repa.load_checkpoint(str(path))["ema"])


@pytest.mark.parametrize("case,z_dims,qk_norm", [("one", (32,), False), ("two", (32, 48), False),
                                                 ("qknorm", (32,), True)])
def test_forward_equals_official(case, z_dims, qk_norm):
    model = fill_(tiny_model(z_dims, qk_norm=qk_norm)).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        v, zs = model(x, t, torch.tensor([1, 7, 1000]))
    assert_golden(v, GOLDEN["forward"][case]["v"])
    assert len(zs) == len(z_dims)
    for z, expected in zip(zs, GOLDEN["forward"][case]["zs"]):
        assert_golden(z, expected)


def test_pos_embed_equals_official():
    assert_golden(tiny_model().pos_embed, GOLDEN["pos_embed"])


# ---------------------------------------------------------------------------------------------
# The REPA family. iREPA's conv projector and spatially normalised target, equal to the official
# iREPA code (End2End-Diffusion/iREPA, ldm/models/sit.py and ldm/utils.py at its commit 99ad4ac):
# its SiT with projection_layer_type="conv" filled by fill_ (the same sorted keys), the inputs of
# test_forward_equals_official; spatial_zscore on GOLDEN_IREPA_FEAT.
# ---------------------------------------------------------------------------------------------
GOLDEN_IREPA = {
    "conv3": {"v": [-84.14913060469553, 402.7037110628444, 21.557417012880414, 0.8718723058700562,
                    -0.3351539373397827, 0.7438353896141052, -0.7868244051933289,
                    0.4630834460258484, -0.8398630023002625],
              "zs": [[-340.7697189450264, 5961.307673814291, 21.293244389621762,
                      -0.3945276141166687, 0.3335508108139038, 1.3136543035507202,
                      -2.0195446014404297, 0.8998187780380249, 1.7542483806610107]]},
    "conv1": {"v": [29.966824458213523, 507.93712946497686, -1.472966078022556,
                    -0.5111205577850342, -0.8701865673065186, 0.6360722780227661,
                    -0.966271698474884, -0.3795293867588043, -0.8000218868255615],
              "zs": [[70.69154735573102, 1212.236193205991, 23.493742944810812,
                      -1.1595479249954224, 2.3696794509887695, -1.5126457214355469,
                      -1.3776260614395142, 0.7235586643218994, -1.0450048446655273]]},
    "conv3x2": {"v": [-243.11361008509994, 527.8844393512122, 13.89645286459073,
                      0.39727121591567993, -1.0198909044265747, -0.23716560006141663,
                      -1.3348017930984497, -1.458411455154419, -2.084660530090332],
                "zs": [[-226.23089673835784, 6225.946319527774, 23.1154229797902,
                        -0.00834435224533081, 0.1637846827507019, 2.6539034843444824,
                        -2.0273079872131348, 0.5908084511756897, 1.8183586597442627],
                       [158.9547480121255, 6824.213379838107, -1.6689277516109549,
                        1.558656930923462, 0.17348483204841614, -0.18195194005966187,
                        -0.7244253158569336, -0.05744427442550659, 0.6753861308097839]]},
    "zscore0.6": [24.324997512623668, 1105.5913719853456, 0.23924144712131046,
                  -1.6241658926010132, 0.7844306230545044, -1.4543591737747192,
                  -1.2892018556594849, -1.1482363939285278, 0.7718112468719482],
    "zscore1.0": [2.5556655600667e-06, 1079.9988880910475, -3.1830819246949225,
                  -1.5172380208969116, 1.039511799812317, -1.442242980003357,
                  -1.2843776941299438, -0.8740211129188538, 0.6567265391349792]}


def as_checks(values):  # the list of checks() as assert_golden's dict
    return dict(zip(["sum", "sumsq", "wsum"], values[:3]), first=values[3:])


def golden_irepa_feat():  # (3 images, 16 patches, 24 channels), each channel its own offset
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 16, 24, generator=g) * 2 + torch.linspace(-1, 1, 24)


@pytest.mark.parametrize("case,z_dims,kernel", [("conv3", (32,), 3), ("conv1", (32,), 1),
                                                ("conv3x2", (32, 48), 3)])
def test_conv_projector_equals_official_irepa(case, z_dims, kernel):
    model = fill_(tiny_model(z_dims, projector="conv", projector_kernel=kernel)).eval()
    assert [k for k in model.state_dict() if k.startswith("projectors.0")] == [
        "projectors.0.projection_layer.weight", "projectors.0.projection_layer.bias"]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        v, zs = model(x, t, torch.tensor([1, 7, 1000]))
    assert_golden(v, as_checks(GOLDEN_IREPA[case]["v"]))
    for z, expected in zip(zs, GOLDEN_IREPA[case]["zs"], strict=True):
        assert_golden(z, as_checks(expected))


def test_conv_projector_is_a_convolution_over_the_token_grid():
    # by hand: token (i, j) of a 3 x 3 kernel sums its 8 neighbours' and its own D-vectors
    conv = repa.ConvProjector(2, 1, 3, (4, 4))
    with torch.no_grad():
        conv.projection_layer.weight.fill_(1.0)
        conv.projection_layer.bias.zero_()
    x = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 2)  # token n of the row-major 4 x 4 grid
    out = conv(x).view(4, 4)
    grid = torch.arange(16.0).view(4, 4)
    assert out[1, 1] == 2 * grid[0:3, 0:3].sum() and out[0, 3] == 2 * grid[0:2, 2:4].sum()


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_spatial_norm_equals_official_irepa(alpha):
    z = repa.spatial_norm(golden_irepa_feat(), alpha)
    assert_golden(z, as_checks(GOLDEN_IREPA[f"zscore{alpha}"]))
    # the closed form: per image and channel, over the patches, std 1 and mean (1 - alpha) m / s
    feat = golden_irepa_feat()
    m, sd = feat.mean(1), feat.std(1)
    torch.testing.assert_close(z.std(1), torch.ones_like(sd), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.mean(1), (1 - alpha) * m / (sd + 1e-6), rtol=1e-5, atol=1e-5)


def test_a_conv_projector_needs_a_square_grid():
    with pytest.raises(repa.UserError, match="square grid of tokens, got 4 x 2 = 8 tokens"):
        tiny_model(input_size=(8, 4), projector="conv")


# ---------------------------------------------------------------------------------------------
# The REPA family. REG's class token, equal to the official REG code (Martinser/REG, models/sit.py,
# loss.py and samplers.py at its commit 021ea2e): its SiT (TINY's sizes, cls_token_dim 32) filled
# by fill_, the inputs of test_forward_equals_official and a class token; its SILoss with
# cls_token = the target's token 0; its euler_maruyama_sampler, 5 steps, guidance_high 0.85,
# from torch.manual_seed(5), which draws randn_like of the latents, then of the class token.
# ---------------------------------------------------------------------------------------------
GOLDEN_REG = {
    "pos_embed": [525.9784436438931, 511.9999982561337, 34.06142318610279, 0.0, 0.0, 0.0, 0.0, 0.0,
                  0.0],
    "forward": {"v": [83.98162177577615, 377.10319144393065, 9.9703653859317, 0.21650679409503937,
                      -0.17404913902282715, -1.4718748331069946, -0.18011987209320068,
                      0.20167453587055206, -0.6163501739501953],
                "zs": [-62.023882718523964, 27.292603396503168, 0.8050224655246448,
                       -0.18864783644676208, -0.12412576377391815, 0.04001070559024811,
                       -0.056272704154253006, -0.2202889323234558, -0.07800991833209991],
                "cls": [9.064029332250357, 55.33622336112243, 1.1956662915647027,
                        -0.5836790800094604, 0.8693445324897766, -0.5432112812995911,
                        -1.584647297859192, 0.411359965801239, 0.013516545295715332]},
    "loss": {"linear-uniform": {"denoising": [2.719963550567627, 2.4598755836486816,
                                              2.127079725265503],
                                "proj": 0.008987142704427242,
                                "cls": [2.448397397994995, 2.5798537731170654, 2.3512911796569824]},
             "linear-lognormal": {"denoising": [2.3067424297332764, 2.3408663272857666,
                                                2.567594528198242],
                                  "proj": 0.00807829201221466,
                                  "cls": [3.7929067611694336, 2.571486711502075,
                                          3.033846139907837]}},
    "sde": {"cfg2.3-cls2.3": [-17.299058156863943, 512.6397424301665, -1.149346287595757,
                              -0.014010831073030099, 1.0087226414093144, -0.5491062480759381,
                              -1.0362480167317003, 0.06551956869344258, -0.0393988905365147],
            "cfg2.3-cls0": [-17.07918057980358, 512.203202800165, -1.0805476242206407,
                            -0.01899766993658591, 1.0022120733566944, -0.5508086156268872,
                            -1.0381122249486296, 0.06273122581311551, -0.03953705434838154],
            "cfg1": [-23.995796746993186, 495.8612309828131, -0.004268825430048473,
                     0.04769047110930781, 0.9740524950903224, -0.4569043069480805,
                     -0.9056296426773129, 0.06339420113229, 0.12070930290424789]}}


def reg_inputs():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    return x, t, torch.tensor([1, 7, 1000]), torch.randn(3, 32, generator=torch.Generator(
        ).manual_seed(3))


def test_reg_forward_equals_official_reg():
    model = fill_(tiny_model(reg=True)).eval()
    assert sorted(set(model.state_dict()) - set(tiny_model().state_dict())) == [
        "cls_projectors2.bias", "cls_projectors2.weight", "final_layer.linear_cls.bias",
        "final_layer.linear_cls.weight", "wg_norm.bias", "wg_norm.weight"]
    assert model.pos_embed.shape == (1, 17, 64) and not model.pos_embed[0, 0].any()
    assert_golden(model.pos_embed, as_checks(GOLDEN_REG["pos_embed"]))
    x, t, y, cls = reg_inputs()
    with torch.no_grad():
        v, zs, v_cls = model(x, t, y, cls=cls)
    assert zs[0].shape == (3, 17, 32)  # the projector reads the class token too
    for name, value in [("v", v), ("zs", zs[0]), ("cls", v_cls)]:
        assert_golden(value, as_checks(GOLDEN_REG["forward"][name]))


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_reg_loss_equals_official_reg(weighting):
    # (the official's class-token target broadcasts over the batch on the cosine path; the
    # linear path, REG's, is checked)
    model = fill_(tiny_model(reg=True)).eval()
    x, _, y, _ = reg_inputs()
    target = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(2))
    expected = GOLDEN_REG["loss"][f"linear-{weighting}"]
    for coeff in (0.03, 1.0):
        torch.manual_seed(3)
        den, align = repa.repa_loss(model, x, y, [target], "linear", weighting,
                                    cls=target[:, 0], reg_coeff=coeff)
        torch.testing.assert_close(den, torch.tensor(expected["denoising"]) + coeff *
                                   torch.tensor(expected["cls"]), rtol=1e-5, atol=1e-6)
        assert abs(align.item() - expected["proj"]) < 1e-6


@pytest.mark.parametrize("case", list(GOLDEN_REG["sde"]))
def test_reg_sde_sampler_equals_official_reg(case, monkeypatch):
    cfg, cls_cfg = {"cfg2.3-cls2.3": (2.3, 2.3), "cfg2.3-cls0": (2.3, 0.0),
                    "cfg1": (1.0, 2.3)}[case]
    model = fill_(tiny_model(reg=True)).eval()
    g = torch.Generator().manual_seed(4)
    z, cls = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, generator=g)
    real = torch.randn
    torch.manual_seed(5)  # the official's noise, replayed in our joint layout
    noise = iter([torch.cat([real(2, 4, 8, 8, dtype=torch.float64).flatten(1),
                             real(2, 32, dtype=torch.float64)], 1) for _ in range(4)])
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: next(noise))
    joint = repa.JointClassToken(model, (4, 8, 8), cls_cfg)
    x = sample.sample_sde(joint, joint.join(z, cls), torch.tensor([3, 5]), 5, cfg_scale=cfg,
                          guidance_high=0.85)
    assert_golden(joint.split(x)[0], as_checks(GOLDEN_REG["sde"][case]), tol=1e-9)


@pytest.mark.parametrize("cls_cfg", [3.0, 0.0])
def test_reg_ode_steps_the_latents_and_the_class_token_each_by_its_guidance(cls_cfg):
    # one Euler step from t = 1 by hand: x - v, v = u + w (c - u), the class token's w its own
    model = fill_(tiny_model(reg=True)).eval()
    x, _, _, cls = reg_inputs()
    y, ones = torch.tensor([1, 7, 3]), torch.ones(3)
    with torch.no_grad():
        c, _, c_cls = model(x, ones, y, cls=cls)
        u, _, u_cls = model(x, ones, torch.full_like(y, 1000), cls=cls)
    joint = repa.JointClassToken(model, (4, 8, 8), cls_cfg)
    out = joint.split(sample.sample_ode(joint, joint.join(x, cls), y, 1, cfg_scale=2.0))
    torch.testing.assert_close(out[0], (x - (u + 2 * (c - u))).double())
    expected = c_cls if cls_cfg == 0 else u_cls + cls_cfg * (c_cls - u_cls)
    torch.testing.assert_close(out[1], (cls - expected).double())


# ---------------------------------------------------------------------------------------------
# Loss: the alignment term is -cos, so -1 for identical features and about 0 for unrelated
# ones; and both terms equal the official SILoss given the same t and noise.
# ---------------------------------------------------------------------------------------------
class Echo(torch.nn.Module):
    """A 'model' whose projected features are given, to test the alignment term alone."""

    def __init__(self, zs):
        super().__init__()
        self.zs = zs

    def forward(self, x, t, y):
        return torch.zeros_like(x), self.zs


def test_alignment_is_minus_one_for_identical_features():
    z = [torch.randn(4, 16, 32), torch.randn(4, 16, 8)]
    _, align = repa.repa_loss(Echo([3.0 * z[0], z[1]]), torch.randn(4, 4, 8, 8), None, z)
    assert abs(align.item() + 1) < 1e-6  # scale-invariant: 3z is as aligned as z


def test_alignment_is_near_zero_for_unrelated_features():
    torch.manual_seed(0)
    z, other = [torch.randn(8, 256, 768)], [torch.randn(8, 256, 768)]
    _, align = repa.repa_loss(Echo(other), torch.randn(8, 4, 8, 8), None, z)
    assert abs(align.item()) < 0.01


def test_denoising_loss_is_per_sample_mse_to_velocity():
    x, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    den, _ = repa.repa_loss(Echo([torch.randn(3, 16, 4)]), x, None, [torch.randn(3, 16, 4)],
                            t=t, noise=noise)
    # the Echo model predicts v = 0, so the loss is the mean square of v = eps - x (linear path)
    torch.testing.assert_close(den, (noise - x).square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("path_type,weighting", [("linear", "uniform"), ("cosine", "uniform"),
                                                 ("linear", "lognormal"), ("cosine", "lognormal")])
def test_loss_equals_official_siloss(path_type, weighting):
    model = fill_(tiny_model((32, 48))).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([1, 7, 1000])
    g = torch.Generator().manual_seed(2)
    zt = [torch.randn(3, 16, 32, generator=g), torch.randn(3, 16, 48, generator=g)]
    expected = GOLDEN["loss"][f"{path_type}-{weighting}"]
    # the official SILoss draws t and then the noise from the global generator; seeded, our
    # own draws (t=None, noise=None) and explicit ones must both give its numbers
    torch.manual_seed(3)
    den, align = repa.repa_loss(model, x, y, zt, path_type, weighting)
    torch.testing.assert_close(den, torch.tensor(expected["denoising"]), rtol=1e-5, atol=1e-6)
    assert abs(align.item() - expected["proj"]) < 1e-6
    torch.manual_seed(3)
    t = repa.sample_t(3, weighting, path_type)
    den2, align2 = repa.repa_loss(model, x, y, zt, path_type, weighting, t=t,
                                  noise=torch.randn_like(x))
    assert torch.equal(den, den2) and torch.equal(align, align2)


def test_alignment_is_computed_in_fp32_under_autocast():
    # features of magnitude ~50 in fp16: the squared norm (~2e6) overflows fp16's 65504, so
    # normalising in 16 bits gives 0 (or NaN); in fp32 the cosine of z with itself is -1
    torch.manual_seed(0)
    z = torch.randn(2, 256, 768) * 50
    with torch.autocast("cpu", dtype=torch.float16):
        den, align = repa.repa_loss(Echo([z.half()]), torch.randn(2, 4, 8, 8), None, [z.half()])
    assert align.dtype == torch.float32 and den.dtype == torch.float32
    assert abs(align.item() + 1) < 1e-5


def test_loss_backward_reaches_projector_and_blocks():
    model = tiny_model()
    den, align = repa.repa_loss(model, torch.randn(2, 4, 8, 8), torch.tensor([1, 2]),
                                [torch.randn(2, 16, 32)])
    (den.mean() + 0.5 * align).backward()
    assert model.projectors[0][0].weight.grad.abs().sum() > 0
    # at init (adaLN-Zero) the v-loss reaches only the output layer; the alignment term reaches
    # the patch embedding and the gates of the blocks up to encoder_depth, and no further
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0
    assert model.blocks[-1].adaLN_modulation[1].weight.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# DiT + REPA: SiT's network with learn_sigma, the improved DDPM's schedule and hybrid loss.
# Golden numbers from the official DiT (facebookresearch/DiT @ ed81ce2) on the tiny DiT below,
# filled by fill_ (its keys are the official ones, so the weights are the same), in eval mode:
# forward x from seed 1, t = [0, 500, 999], y = [1, 7, 1000]; loss x0 and noise from seed 2,
# y = [1, 7, 3, 1000]; samplers z from seed 4, y = [3, 5], the noise of step n from seed 100 + n.
# The schedule's maths is also checked in closed form, independently of the official code.
# ---------------------------------------------------------------------------------------------
TINY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)
GOLDEN_DIT = {
    'keys_sha256': '0c418a08d54931d5a9a0c06a8bd8dcc46a50e0462353203668eb35c98287d72a',
    # (all parameters, trainable ones) at 256 px: the frozen pos_embed is a Parameter
    'params': {'DiT-XL/2': (675_129_632, 674_834_720), 'DiT-L/2': (458_102_816, 457_840_672),
               'DiT-B/2': (130_512_416, 130_315_808)},
    'forward': [263.79661528393626, 1444.9783011695833, -0.6415497435226483, 1.1515681743621826,
                1.1969413757324219, 0.9862523078918457, 0.2506386339664459, 0.05868900567293167,
                0.4593791365623474],
    # t -> (loss, mse, vb), per sample
    'loss': {
        (0, 1, 500, 999): (
            [4.794565677642822, 2.5786759853363037, 2.364755868911743, 2.1391639709472656],
            [2.0182321071624756, 1.5982856750488281, 2.3461012840270996, 2.108128070831299],
            [2.7763335704803467, 0.9803903698921204, 0.018654627725481987, 0.031035808846354485]),
        (0, 0, 0, 0): (
            [4.794565677642822, 4.269821643829346, 4.322355270385742, 4.500134468078613],
            [2.0182321071624756, 1.6953365802764893, 1.7865411043167114, 1.756808876991272],
            [2.7763335704803467, 2.5744850635528564, 2.535814046859741, 2.743325710296631]),
        (999, 2, 250, 750): (
            [2.3173043727874756, 2.162649631500244, 1.8841397762298584, 2.1542348861694336],
            [2.283684015274048, 1.581362247467041, 1.8697106838226318, 2.130687952041626],
            [0.03362034633755684, 0.5812874436378479, 0.014429052360355854, 0.02354704961180687]),
    },
    # sum |d(sum vb) / d(model output)| over the variance channels at t = [0, 1, 500, 999]
    'vb_grad_var': 0.7294464111328125,
    # the 1000-step tables: (first three, last three, sum)
    'schedule': {
        'betas': ([9.999999999998899e-05, 0.00011991991991988638, 0.00013983983983989479],
                  [0.019960160160160223, 0.01998008008008001, 0.020000000000000018],
                  10.050000000000004),
        'alphas_cumprod': ([0.9999, 0.9997800920720721, 0.9996402829841216],
                           [4.202152991415678e-05, 4.118193638138445e-05, 4.035829765375676e-05],
                           275.51323339680613),
        'posterior_variance': ([0.0, 5.453187661300667e-05, 8.548911523094303e-05],
                               [0.019960143076755768, 0.019980063304243127, 0.019999983526560627],
                               10.035505610704288),
        'posterior_log_variance_clipped': (
            [-9.81672513529595, -9.81672513529595, -9.367121497366247],
            [-3.9140178399503736, -3.9130203373862122, -3.912023829100454], -4896.90725843247),
        'posterior_mean_coef1': (
            [1.0, 0.5452914995101377, 0.38870683586738325],
            [0.0001307062445096018, 0.00012952423622957586, 0.00012835148717224693],
            10.900027749952438),
        'posterior_mean_coef2': ([0.0, 0.4547084989905303, 0.6112931602877927],
                                 [0.9899687683240964, 0.9899587234910676, 0.9899486782675173],
                                 985.4293898988383),
    },
    # respacing: the original timesteps kept (250: the first and last ten), the betas of 5
    'kept': {5: [0, 250, 500, 749, 999], 10: [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
             25: [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624,
                  666, 708, 749, 791, 832, 874, 916, 957, 999],
             250: [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 963, 967, 971, 975, 979, 983, 987, 991,
                   995, 999]},
    'betas_5': [9.999999999998899e-05, 0.47852482186365886, 0.8507993437253065,
                0.9569319491434207, 0.9879547261295479],
    # (steps, cfg scale) -> checks() of the final samples (the first half, for the guided run).
    # With cfg 1.5 DiT's own forward_with_cfg (guiding eps channels 0-2 only) gives sum
    # -24385.85665678978; we guide all four eps channels (the standard form), as the run below.
    'sampler': {
        (5, 1.0): [-26768.932172060013, 29918977.950281136, -8766.739697709243,
                   -205.98252868652344, 171.1439971923828, -63.34773254394531,
                   -50.84544372558594, -70.46080780029297, -155.36285400390625],
        (10, 1.0): [-23591.157784700394, 34965246.85294618, -8576.07280543499,
                    -194.38185119628906, 293.5126037597656, -15.358827590942383,
                    26.31850242614746, -101.02311706542969, -140.5106964111328],
        (25, 1.0): [-19082.907080709934, 46233144.67316873, -7094.424683971298,
                    -223.5325469970703, 478.465087890625, 45.17462921142578,
                    176.8059539794922, -83.40523529052734, -160.25836181640625],
        (10, 1.5): [-24143.182900607586, 34864796.14398091, -8528.087546782834,
                    -186.66976928710938, 278.8367004394531, -12.839264869689941,
                    11.300320625305176, -101.18553924560547, -160.1494140625],
    },
}


def tiny_dit():
    return fill_(repa.SiT(**TINY_DIT, z_dims=())).eval()


def test_dit_keys_and_size_table_equal_official():
    model = tiny_dit()
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items())
    assert hashlib.sha256(lines.encode()).hexdigest() == GOLDEN_DIT["keys_sha256"]
    assert sum(p.numel() for p in model.parameters()) == 395_936
    assert repa.size_config("DiT-XL/2") == dict(repa.SIZES["XL/2"], learn_sigma=True)
    assert (repa.SIZES["DiT-B/2"]["encoder_depth"], repa.SIZES["DiT-L/2"]["encoder_depth"]) == (4, 8)
    assert all(repa.SIZES[f"DiT-{k}"] == dict(v, learn_sigma=True) for k, v in repa.SIZES.items()
               if not k.startswith("DiT-"))


@pytest.mark.parametrize("name", list(GOLDEN_DIT["params"]))
def test_dit_parameter_counts_equal_official(name):
    with torch.device("meta"):
        model = repa.build_model(name, input_size=32, z_dims=[])
    counts = (sum(p.numel() for p in model.parameters()),
              sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert counts == GOLDEN_DIT["params"][name]
    assert model.final_layer.linear.out_features == 2 * 2 * 2 * 4  # p * p * 2C: eps and v


def test_dit_forward_equals_official():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        out, zs = tiny_dit()(x, torch.tensor([0, 500, 999]), torch.tensor([1, 7, 1000]))
    assert out.shape == (3, 8, 8, 8) and zs == []
    assert_golden(out, dict(zip(["sum", "sumsq", "wsum"], GOLDEN_DIT["forward"][:3]),
                            first=GOLDEN_DIT["forward"][3:]))


def test_ddpm_schedule_and_respacing_equal_official():
    sched = repa.ddpm_schedule()
    for name, (first, last, total) in GOLDEN_DIT["schedule"].items():
        table = sched[name]
        assert table.dtype == torch.float64 and len(table) == 1000
        torch.testing.assert_close(table[:3], torch.tensor(first, dtype=torch.float64),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close(table[-3:], torch.tensor(last, dtype=torch.float64),
                                   rtol=1e-12, atol=0)
        assert abs(table.sum().item() - total) <= 1e-12 * abs(total)
    for n, kept in GOLDEN_DIT["kept"].items():
        got = repa.space_timesteps(n)
        assert (got[:10] + got[-10:] if n == 250 else got) == kept and len(got) == n
    assert repa.ddpm_schedule(5)["timesteps"].tolist() == GOLDEN_DIT["kept"][5]
    torch.testing.assert_close(repa.ddpm_schedule(5)["betas"],
                               torch.tensor(GOLDEN_DIT["betas_5"], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    with pytest.raises(repa.UserError, match="2 to 1000 steps"):
        repa.space_timesteps(1)


class Capture(torch.nn.Module):
    """Wraps a model and keeps its last input x_t and output, with the output's gradient."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, {}

    def forward(self, x, t, y):
        out, zs = self.model(x, t, y)
        out.retain_grad()
        self.seen.update(x_t=x, out=out)
        return out, zs


def loss_inputs():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    return x0, noise, torch.tensor([1, 7, 3, 1000])


@pytest.mark.parametrize("t", list(GOLDEN_DIT["loss"]))
def test_ddpm_hybrid_loss_equals_official(t):
    model, (x0, noise, y) = Capture(tiny_dit()), loss_inputs()
    t_ = torch.tensor(t)
    loss, align = repa.ddpm_loss(model, x0, y, [], t=t_, noise=noise)
    eps, v = model.seen["out"].chunk(2, dim=1)
    vb = repa.ddpm_vb(repa.ddpm_schedule(), x0, model.seen["x_t"], t_, eps, v)
    expected = [torch.tensor(e) for e in GOLDEN_DIT["loss"][t]]
    assert loss.shape == (4,) and loss.dtype == torch.float32 and align.item() == 0
    for got, want in zip([loss, loss - vb, vb], expected):  # loss, mse, vb
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_ddpm_loss_draws_t_then_the_noise_as_dit():
    # DiT's train.py draws t = randint(0, 1000) and then the noise (in training_losses), from
    # the global generator: seeded alike, our own draws give the loss of those explicit ones
    model, (x0, _, y) = tiny_dit(), loss_inputs()
    torch.manual_seed(3)
    drawn, _ = repa.ddpm_loss(model, x0, y, [])
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (4,))
    assert torch.equal(drawn, repa.ddpm_loss(model, x0, y, [], t=t, noise=torch.randn_like(x0))[0])

def test_ddpm_vb_trains_only_the_variance():
    # the stop-gradient: eps gets the gradient of the mse alone, 2 (eps - noise) / (C H W), and
    # the variance value v that of the bound (the official sum of its absolute values)
    model, (x0, noise, y) = Capture(tiny_dit()), loss_inputs()
    loss, _ = repa.ddpm_loss(model, x0, y, [], t=torch.tensor([0, 1, 500, 999]), noise=noise)
    loss.sum().backward()
    out = model.seen["out"]
    torch.testing.assert_close(out.grad[:, :4], 2 * (out[:, :4] - noise).detach() / 256)
    assert abs(out.grad[:, 4:].abs().sum().item() - GOLDEN_DIT["vb_grad_var"]) < 1e-5


def closed_form_posterior(kept):
    """Bayes on q(x_s | x_0) = N(sqrt(a_s) x_0, 1 - a_s) and q(x_k | x_s) = N(sqrt(a_k / a_s) x_s,
    1 - a_k / a_s), s the kept step before k, from DDPM's linear betas alone: the precision is
    1 / (1 - a_s) + (a_k / a_s) / (1 - a_k / a_s); returns (c1, c2, variance) for i >= 1."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[kept]
    a_k, a_s = abar[1:], abar[:-1]
    alpha = a_k / a_s
    var = 1 / (1 / (1 - a_s) + alpha / (1 - alpha))
    return var * a_s.sqrt() / (1 - a_s), var * alpha.sqrt() / (1 - alpha), var, abar


@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_posterior_is_bayes_rule(steps):
    sched = repa.ddpm_schedule(steps)
    c1, c2, var, abar = closed_form_posterior(repa.space_timesteps(steps))
    # respacing keeps the marginals q(x_k | x_0) of the kept steps
    torch.testing.assert_close(sched["alphas_cumprod"], abar, rtol=1e-12, atol=0)
    for name, want in [("posterior_mean_coef1", c1), ("posterior_mean_coef2", c2),
                       ("posterior_variance", var)]:
        torch.testing.assert_close(sched[name][1:], want, rtol=1e-9, atol=0)
    # step 0 has a known x_0: mean x_0, variance 0, whose log is clipped to step 1's
    assert (sched["posterior_mean_coef1"][0], sched["posterior_mean_coef2"][0],
            sched["posterior_variance"][0]) == (1, 0, 0)
    assert sched["posterior_log_variance_clipped"][0] == sched["posterior_log_variance_clipped"][1]
    # the model's Gaussian: the true eps gives back x_0, so its mean is the posterior's; v = -1
    # and v = 1 give the posterior's variance and beta
    torch.manual_seed(0)
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([1, 7, 20])
    a = repa.schedule_at(sched["alphas_cumprod"], t)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    post_mean, _ = repa.ddpm_posterior(sched, x0, x_t, t)
    want = c1[t - 1].view(-1, 1, 1, 1) * x0.double() + c2[t - 1].view(-1, 1, 1, 1) * x_t.double()
    torch.testing.assert_close(post_mean.double(), want, rtol=1e-5, atol=1e-5)
    for v, table in [(-1, "posterior_log_variance_clipped"), (1, "log_betas")]:
        mean, log_var, x0_pred = repa.ddpm_model_gaussian(sched, x_t, t, noise,
                                                          torch.full_like(x0, v))
        torch.testing.assert_close(x0_pred, x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mean, post_mean, rtol=1e-4, atol=1e-4)
        assert torch.equal(log_var, repa.schedule_at(sched[table], t).expand_as(x0))


def test_ddpm_vb_is_zero_for_the_true_posterior_and_the_decoder_is_a_distribution():
    sched = repa.ddpm_schedule()
    torch.manual_seed(0)
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([1, 600])
    a = repa.schedule_at(sched["alphas_cumprod"], t)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    # the KL is 0 when the model's Gaussian is the true posterior (exact eps and v = -1), and
    # with eps off by 0.1 it is the closed form (dm)^2 / (2 var) in bits, dm = c1 * 0.1 dx0/deps
    true_var = -torch.ones_like(x0)
    assert repa.ddpm_vb(sched, x0, x_t, t, noise, true_var).abs().max() < 1e-5
    c1, var = sched["posterior_mean_coef1"][t], sched["posterior_variance"][t]
    dm = c1 * sched["sqrt_recipm1_alphas_cumprod"][t] * 0.1
    torch.testing.assert_close(repa.ddpm_vb(sched, x0, x_t, t, noise + 0.1, true_var).double(),
                               dm ** 2 / (2 * var) / math.log(2), rtol=1e-3, atol=0)
    # the decoder's 256 bins of 8-bit data in [-1, 1] carry probability 1 in all; each bin's
    # mass is close to the exact Gaussian's (the official tanh approximation of the CDF)
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.3, -3.0), (-0.98, -5.0), (0.0, 0.5)]:
        m, s = torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        p = torch.exp(-repa.discretized_gaussian_nll(levels, m, s))
        assert abs(p.sum().item() - 1) < 1e-9
        edges = torch.cat([levels[:1] - math.inf, (levels[1:] + levels[:-1]) / 2,
                           levels[-1:] + math.inf])
        exact = torch.diff(torch.special.ndtr((edges - mean) / math.exp(log_scale)))
        assert (p - exact).abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------
# Encoders: the same timm classes with tiny random weights; the preprocessing and the patch
# tokens follow the official code; missing weights are one clear line.
# ---------------------------------------------------------------------------------------------
TINY_VIT = dict(pretrained=False, depth=1, embed_dim=48, num_heads=2)


@pytest.mark.parametrize("spec,resolution,tokens,dims", [
    ("dinov2-vit-b", 256, 256, [48]), ("dinov2-vit-b", 512, 1024, [48]),
    ("dinov2reg-vit-s,dinov3-vit-b,clip-vit-l", 256, 256, [48, 48, 48])])
def test_encoders_give_one_token_per_sit_patch(spec, resolution, tokens, dims):
    encoders = repa.load_encoders(spec, resolution, **TINY_VIT)
    images = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8)
    feats = repa.encode(encoders, images)
    assert [f.shape for f in feats] == [(2, tokens, d) for d in dims]
    assert [e.dim for e in encoders] == dims
    assert all(not p.requires_grad for e in encoders for p in e.model.parameters())


def test_dinov2_preprocessing_and_tokens_follow_official():
    import timm
    (enc,) = repa.load_encoders("dinov2-vit-b", 256, **TINY_VIT)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    # the official recipe, written out: /255, ImageNet normalise, then bicubic to 224, then
    # the normed tokens without CLS (x_norm_patchtokens)
    x = images.float() / 255
    x = (x - torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, 224, mode="bicubic")
    tokens = enc.model.forward_features(x)  # [CLS, patches], after the final norm
    torch.testing.assert_close(repa.encode([enc], images)[0], tokens[:, 1:])


def test_encoder_weights_from_a_local_file_are_resampled(tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed
    # a checkpoint at DINOv2's native 518 px (a 37 x 37 grid), as released
    native = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0,
                               **{k: v for k, v in TINY_VIT.items() if k != "pretrained"})
    path = tmp_path / "dinov2_tiny.pth"
    # the original DINOv2 layout (torch.hub's .pth) has a mask_token that timm drops on load
    torch.save({**native.state_dict(), "mask_token": torch.zeros(1, 48)}, path)
    kw = {k: v for k, v in TINY_VIT.items() if k != "pretrained"}
    (enc,) = repa.load_encoders(f"dinov2-vit-b={path}", 256, **kw)
    expected = resample_abs_pos_embed(native.pos_embed.data, [16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(enc.model.pos_embed.data, expected)
    qkv = enc.model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(qkv, native.blocks[0].attn.qkv.weight)


def one_line_error(code, env=None):
    """Run repa code in a fresh interpreter; return its UserError message."""
    wrapped = f"import repa\ntry:\n    {code}\nexcept repa.UserError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True,
                         cwd=HERE, env={**os.environ, **(env or {})}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_encoder_errors_are_one_clear_line(tmp_path):
    msg = one_line_error("repa.load_encoders('dinov9-vit-b')")
    assert msg.startswith("unknown encoder 'dinov9-vit-b'") and "dinov2-vit-b" in msg
    msg = one_line_error(f"repa.load_encoders('dinov2-vit-b={tmp_path}/none.pth')")
    assert "not found" in msg and "\n" not in msg
    # no weights in an empty cache, offline: say how to provide them, and do not hang on retries
    msg = one_line_error("repa.load_encoders('dinov2-vit-b')",
                         env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert "not in the Hugging Face cache" in msg and "dinov2-vit-b=PATH" in msg
    assert "\n" not in msg
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    msg = one_line_error(f"repa.load_encoders('dinov2-vit-b={bad}')")
    assert msg.startswith("cannot load encoder dinov2-vit-b") and "\n" not in msg


# Numbers from the official code (see the module docstring): checks() of its outputs.
GOLDEN = {'xl2_keys_sha256': '341b9e369bd2b388e98bf15b89f7f9cf9200d29faf69bdda0d5a87abd069e1c5',
 'pos_embed': {'sum': 525.9784436438931,
               'sumsq': 511.9999982561337,
               'wsum': 3.2865558260846175,
               'first': [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]},
 'forward': {'one': {'v': {'sum': -175.13577309343964,
                           'sumsq': 605.5383962880792,
                           'wsum': -2.8215220687604994,
                           'first': [-0.012173786759376526,
                                     0.8258891701698303,
                                     -1.3127827644348145,
                                     -0.3223898410797119,
                                     -0.6926365494728088,
                                     -0.22500263154506683]},
                     'zs': [{'sum': -8.858659791760147,
                             'sumsq': 71.61608211591886,
                             'wsum': 0.503500069829511,
                             'first': [-0.0624191090464592,
                                       -0.4538462162017822,
                                       -0.15953966975212097,
                                       0.05265562981367111,
                                       0.31023919582366943,
                                       -0.19657093286514282]}]},
             'two': {'v': {'sum': -159.0311583634466,
                           'sumsq': 617.0744362815796,
                           'wsum': 0.7595257529967037,
                           'first': [-0.9718014597892761,
                                     -1.627055287361145,
                                     -1.698725938796997,
                                     -1.6695367097854614,
                                     -2.2590315341949463,
                                     -1.5627899169921875]},
                     'zs': [{'sum': -6.075656914617866,
                             'sumsq': 62.646136617748965,
                             'wsum': -1.154244518366486,
                             'first': [-0.2880416810512543,
                                       -0.22229072451591492,
                                       -0.1195259615778923,
                                       0.059041060507297516,
                                       0.2251790463924408,
                                       -0.1964433342218399]},
                            {'sum': -9.749729291303083,
                             'sumsq': 50.53334235419193,
                             'wsum': -2.45539743669747,
                             'first': [-0.006397537887096405,
                                       -0.0779171884059906,
                                       -0.19409507513046265,
                                       -0.17114779353141785,
                                       0.021673550829291344,
                                       0.07056654989719391]}]},
             'qknorm': {'v': {'sum': -225.67822299804538,
                              'sumsq': 582.2988127569575,
                              'wsum': -5.178195856063539,
                              'first': [-0.8233683109283447,
                                        -1.9146021604537964,
                                        -0.1159355640411377,
                                        -1.4264401197433472,
                                        -0.5224166512489319,
                                        -1.871578574180603]},
                        'zs': [{'sum': -100.87160535762087,
                                'sumsq': 92.12587592792353,
                                'wsum': -0.5685400464705539,
                                'first': [-0.16780883073806763,
                                          -0.01751607283949852,
                                          0.3389964997768402,
                                          -0.206129789352417,
                                          -0.05579955875873566,
                                          -0.025068148970603943]}]}},
 'loss': {'linear-uniform': {'denoising': [3.199169158935547, 2.533921003341675, 2.865037679672241],
                             'proj': 0.0006485972553491592},
          'cosine-uniform': {'denoising': [3.7116951942443848,
                                           2.8269948959350586,
                                           3.257711172103882],
                             'proj': 0.0010485214879736304},
          'linear-lognormal': {'denoising': [2.834376096725464,
                                             2.2554261684417725,
                                             3.0378952026367188],
                               'proj': 0.004693607334047556},
          'cosine-lognormal': {'denoising': [3.3355555534362793,
                                             2.6113247871398926,
                                             3.533881425857544],
                               'proj': 0.007538554724305868}}}


# ---------------------------------------------------------------------------------------------
# Data: ImageFolder -> shards (ADM crop, VAE moments) -> reader, resumable and robust; the
# reader's order is seeded, split across ranks and resumable.
# ---------------------------------------------------------------------------------------------
def tiny_vae(path):
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(path)
    return str(path)


def image_folder(root, per_class=(3, 4, 2)):
    """A tiny ImageNet-style folder with odd sizes, two formats and one corrupt file."""
    from PIL import Image
    rng = np.random.default_rng(1)
    for c, n in enumerate(per_class):
        os.makedirs(root / f"n{c:08d}")
        for i in range(n):
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
                root / f"n{c:08d}" / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (root / "n00000001" / "broken.JPEG").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def run_repa(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "repa.py"), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=timeout, cwd=HERE)


def cli(capsys, *args):
    """(exit code, stdout, stderr) of repa's command line run in this process: for checks of
    one-line errors, which need no new interpreter (about 7 s of imports each here). The real
    `python repa.py` is run by the tests that use run_repa."""
    capsys.readouterr()
    try:
        repa.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def test_a_vae_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(repa.UserError, match=f"there is no folder {tmp_path / 'nope'}"):
        repa.load_vae(str(tmp_path / "nope"))


def test_reader_order_is_seeded_disjoint_and_resumable():
    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]
    n, b = 100, 5
    # 2 ranks x 1 micro-batch see exactly what 1 rank x 2 micro-batches sees, slot by slot
    r0, r1 = (take(repa.ResumableBatches(n, b, rank=r, world=2, seed=3), 10) for r in (0, 1))
    single = take(repa.ResumableBatches(n, b, accum=2, seed=3), 20)
    assert single[0::2] == r0 and single[1::2] == r1
    assert sorted(sum(single[:20], [])) == list(range(100))  # one epoch: every sample once
    # resuming at (epoch, position) continues the same stream, across the epoch boundary
    stream = take(repa.ResumableBatches(n, b, seed=3), 30)
    resumed = take(repa.ResumableBatches(n, b, seed=3, start=23), 7)  # epoch 1, batch 3
    assert resumed == stream[23:30]
    assert stream[:10] != stream[20:30]  # a new permutation each epoch (20 batches each)


def test_fit_steps_with_warmup_then_half_cosine():
    # loss = p has gradient 1: Adam's first steps are then lr_s each (m / sqrt(v) = 1), so the
    # parameter's path is minus the running sum of the schedule, checked against its closed form
    p, seen = torch.nn.Parameter(torch.zeros(())), []
    repa.fit([p], lambda step: seen.append(p.item()) or p * 1.0, 10, 0.1, weight_decay=0,
             warmup=4)
    lrs = [0.1 * min(1, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    expected = [-sum(lrs[:s]) for s in range(10)]
    assert seen == pytest.approx(expected, abs=1e-6)
    assert p.item() == pytest.approx(-sum(lrs), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Training: DDP equals accumulation; a resume (also after SIGTERM) continues exactly;
# checkpoints are atomic and in the official layout; bad input is one clear line.
# ---------------------------------------------------------------------------------------------
DEMO_FAST = ["--batch-size", "16", "--log-every", "1", "--sample-every", "0"]  # tools/demo.py's


def weights(path):
    ckpt = repa.load_checkpoint(str(path))
    return ckpt, {**{"model." + k: v for k, v in ckpt["model"].items()},
                  **{"ema." + k: v for k, v in ckpt["ema"].items()}}


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--align-until", "1"]], ids=["repa", "haste"])
def test_one_ddp_step_on_two_processes_equals_accumulation(tmp_path, flags):
    # with --align-until 1, step 2's projectors have no gradient: DDP must still agree
    a = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--standalone", DEMO_PY, *DEMO_FAST, *flags,
                        "--max-steps", "2", "--results-dir", str(tmp_path / "ddp")],
                       capture_output=True, text=True, timeout=300, cwd=HERE)
    assert a.returncode == 0, a.stderr[-2000:]
    b = run_demo(*DEMO_FAST, *flags, "--max-steps", "2", "--grad-accum", "2",
                 "--results-dir", str(tmp_path / "one"))
    assert b.returncode == 0, b.stderr[-2000:]
    _, wa = weights(tmp_path / "ddp" / "demo" / "checkpoints" / "0000002.pt")
    _, wb = weights(tmp_path / "one" / "demo" / "checkpoints" / "0000002.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


# iREPA's projector and target, and a resume across HASTE's stop at step 4
FAMILY = ["--projector", "conv", "--spatial-norm", "0.6", "--align-until", "4"]


@pytest.mark.parametrize("flags", [[], FAMILY, ["--reg"]], ids=["repa", "irepa-haste", "reg"])
def test_resume_is_exact(tmp_path, flags, capsys):
    full = run_demo(*DEMO_FAST, *flags, "--max-steps", "6", "--results-dir", str(tmp_path / "full"))
    half = run_demo(*DEMO_FAST, *flags, "--max-steps", "3", "--results-dir", str(tmp_path / "half"))
    rest = run_demo(*DEMO_FAST, *flags, "--max-steps", "6", "--results-dir", str(tmp_path / "half"))
    assert full.returncode == half.returncode == rest.returncode == 0, rest.stderr[-2000:]
    assert "resumed from" in rest.stdout and "at step 3" in rest.stdout
    said = "step 4: --align-until reached"  # once, at the step
    assert [r.stdout.count(said) for r in (full, half, rest)] == (
        [1, 0, 1] if flags == FAMILY else [0] * 3)
    ca, wa = weights(tmp_path / "full" / "demo" / "checkpoints" / "0000006.pt")
    cb, wb = weights(tmp_path / "half" / "demo" / "checkpoints" / "0000006.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ca["data"] == cb["data"] and ca["steps"] == cb["steps"] == 6
    sa, sb = ca["opt"]["state"], cb["opt"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    if flags == FAMILY:  # the alignment term is 0 from step 5
        assert ca["model_kwargs"]["projector"] == "conv" and ca["args"]["spatial_norm"] == 0.6
        rows = open(tmp_path / "full" / "demo" / "metrics.jsonl")
        aligns = [json.loads(row)["align"] for row in rows]
        assert 0 not in aligns[:4] and aligns[4:] == [0, 0]
    if flags:  # the run folder samples with no flags
        assert ca["model_kwargs"]["reg"] == ca["args"]["reg"] == (flags != FAMILY)
        sample.main(["--ckpt", str(tmp_path / "half" / "demo"), "--sample-dir", str(tmp_path),
                     "--num-steps", "2"])
        assert "-grid.png" in capsys.readouterr().out


def test_sigterm_saves_exits_zero_and_resumes_like_an_unbroken_run(tmp_path):
    import signal
    args = [sys.executable, DEMO_PY, *DEMO_FAST, "--max-steps", "20"]
    proc = subprocess.Popen(args + ["--results-dir", str(tmp_path / "cut")], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until it is really training
        if line.startswith("step 5 "):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    ckpt, _ = weights(tmp_path / "cut" / "demo" / "checkpoints" / "latest.pt")
    assert 5 <= ckpt["steps"] < 20
    rest = subprocess.run(args + ["--results-dir", str(tmp_path / "cut")], cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0 and f"at step {ckpt['steps']}" in rest.stdout
    whole = subprocess.run(args + ["--results-dir", str(tmp_path / "whole")], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    _, wa = weights(tmp_path / "cut" / "demo" / "checkpoints" / "0000020.pt")
    _, wb = weights(tmp_path / "whole" / "demo" / "checkpoints" / "0000020.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "latest.pt")
    repa.write_checkpoint(path, {"steps": 1, "w": torch.ones(3)})

    def dies_mid_write(obj, f):  # like a SIGKILL halfway through the write
        f.write(b"half a checkpoint")
        raise SystemExit("killed")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(SystemExit):
        repa.write_checkpoint(path, {"steps": 2, "w": torch.zeros(3)})
    assert repa.load_checkpoint(path)["steps"] == 1


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    import signal
    import time
    code = ("import sys, torch, repa\n"
            "repa.write_checkpoint(sys.argv[1], {'steps': 1})\n"
            "repa.write_checkpoint(sys.argv[1], {'steps': 2, 'w': torch.zeros(2**28)})\n")
    path = tmp_path / "latest.pt"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=HERE)
    deadline = time.time() + 60
    while not path.exists() or not any(f.name.startswith("latest.pt.tmp") and
                                       f.stat().st_size > 0 for f in tmp_path.iterdir()):
        # wait until the first checkpoint is in place and the second write has begun
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert repa.load_checkpoint(str(path))["steps"] == 1


def test_official_checkpoint_layout_loads_with_weights_only(tmp_path):
    import argparse
    model = fill_(tiny_model())
    official = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "steps": 7,
                "args": argparse.Namespace(model="SiT-XL/2", enc_type="dinov2-vit-b")}
    torch.save(official, tmp_path / "0000007.pt")
    ckpt = repa.load_checkpoint(str(tmp_path / "0000007.pt"))  # weights_only=True inside
    assert ckpt["args"].model == "SiT-XL/2" and ckpt["steps"] == 7
    repa.load_sit_weights(tiny_model(), ckpt["ema"])


def test_the_newest_checkpoint_is_the_one_with_most_steps_not_the_newest_file(tmp_path):
    # a copy that does not keep file times (cp -r) must not resume an older checkpoint
    for name, steps in (("0000004.pt", 4), ("latest.pt", 6), ("0000002.pt", 2)):
        torch.save({"steps": steps}, tmp_path / name)  # written last: the newest file
    assert repa.newest_checkpoint(str(tmp_path)) == str(tmp_path / "latest.pt")
    torch.save({"steps": 4}, tmp_path / "latest.pt")  # of equal steps, the numbered one
    assert repa.newest_checkpoint(str(tmp_path)) == str(tmp_path / "0000004.pt")
    assert repa.newest_checkpoint(str(tmp_path / "none")) is None
    # --resume, sample.py and --analyze take a file, a run folder or its checkpoints/
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(repa.UserError, match="no checkpoint in"):
        repa.checkpoint_in(str(tmp_path / "run"))
    os.replace(tmp_path / "0000004.pt", tmp_path / "run" / "checkpoints" / "0000004.pt")
    assert repa.checkpoint_in(str(tmp_path / "run")) == str(
        tmp_path / "run" / "checkpoints" / "0000004.pt")


def test_resume_from_a_checkpoint_for_another_model_is_one_line(tmp_path, capsys):
    other = tmp_path / "other.pt"
    model = tiny_model()
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "steps": 1,
                "data": {"epoch": 0, "position": 0}}, other)
    out = run_demo(*DEMO_FAST, "--max-steps", "2", "--resume", str(other),
                   "--results-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and out.stderr.startswith("error: checkpoint does not fit")
    assert out.stderr.strip().count("\n") == 0
    torch.save(model.state_dict(), other)  # weights alone: nothing to resume from
    out = run_demo(*DEMO_FAST, "--max-steps", "2", "--resume", str(other),
                   "--results-dir", str(tmp_path / "r"))
    code, err = out.returncode, out.stderr
    assert code == 2 and "is not a training checkpoint (no model, ema, opt, steps)" in err


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    ok = run_demo(*DEMO_FAST, "--max-steps", "2", "--results-dir", str(tmp_path))
    assert ok.returncode == 0
    out = run_demo(*DEMO_FAST, "--max-steps", "10", "--lr", "1e30",
                   "--results-dir", str(tmp_path))
    assert out.returncode == 2 and "non-finite loss" in out.stderr
    ckpts = os.listdir(tmp_path / "demo" / "checkpoints")
    assert ckpts == ["0000002.pt"]
    assert repa.load_checkpoint(str(tmp_path / "demo" / "checkpoints" / "0000002.pt"))["steps"] == 2


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path):
    # schedulers signal the whole group: the DataLoader workers must not die before the save
    import signal
    proc = subprocess.Popen([sys.executable, DEMO_PY, *DEMO_FAST,
                             "--max-steps", "200", "--num-workers", "2",
                             "--results-dir", str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 3 "):
            break
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert repa.load_checkpoint(str(tmp_path / "demo" / "checkpoints" / "latest.pt"))["steps"] >= 3


def test_a_non_finite_loss_is_never_saved(tmp_path):
    # latest.pt falls due at step 2, before the first log line at step 5
    out = run_demo(*DEMO_FAST, "--log-every", "5", "--latest-every", "2", "--max-steps", "10",
                   "--lr", "1e30", "--results-dir", str(tmp_path))
    assert out.returncode == 2 and "non-finite" in out.stderr
    ckpts = tmp_path / "demo" / "checkpoints"
    assert not os.path.exists(ckpts) or not os.listdir(ckpts)


@pytest.mark.slow
def test_resume_from_an_official_checkpoint_and_refusal_of_another_experiment(tmp_path):
    import argparse
    first = run_demo(*DEMO_FAST, "--max-steps", "2", "--results-dir", str(tmp_path / "a"))
    assert first.returncode == 0
    ours = repa.load_checkpoint(str(tmp_path / "a" / "demo" / "checkpoints" / "0000002.pt"))
    official = {k: ours[k] for k in ("model", "ema", "opt", "steps")}
    official["args"] = argparse.Namespace(model="SiT-XL/2")  # no "data", no model_kwargs
    torch.save(official, tmp_path / "official.pt")
    out = run_demo(*DEMO_FAST, "--max-steps", "3", "--resume", str(tmp_path / "official.pt"),
                   "--results-dir", str(tmp_path / "b"))
    assert out.returncode == 0 and "at step 2" in out.stdout, out.stderr[-2000:]
    # the same run folder with another method: one line, and the checkpoint is kept
    out = run_demo(*DEMO_FAST, "--max-steps", "4", "--proj-coeff", "1.0",
                   "--results-dir", str(tmp_path / "a"))
    assert out.returncode == 2 and "another experiment (proj_coeff 0.5 -> 1.0)" in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert os.listdir(tmp_path / "a" / "demo" / "checkpoints") == ["0000002.pt"]


@pytest.mark.parametrize("flags,message", [
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["--max-step", "3"], "unrecognized arguments"),
    (["--demo"], "unrecognized arguments: --demo"),
    (["--path-type", "edm"], "argument --path-type: invalid choice: 'edm'")])
def test_bad_flags_are_one_clear_line(flags, message, capsys):
    code, out, err = cli(capsys, *flags)
    assert code == 2 and message in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_training_steps_have_no_host_sync(tmp_path):
    # --sync-debug makes CUDA raise on any host-device sync inside a step (bf16 autocast, the
    # encoder, the loss, fused AdamW, the EMA); logging and checkpoints are outside the step
    out = run_demo(*DEMO_FAST, "--max-steps", "4", "--num-workers", "2", "--sync-debug",
                   "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]


def test_flags_are_generated_from_the_config():
    cfg = repa.parse_args(["--batch-size", "32", "--no-qk-norm", "--path-type", "cosine"])
    assert cfg.batch_size == 32 and cfg.path_type == "cosine" and cfg.lr == 1e-4
    assert (cfg.ema_decay, cfg.proj_coeff, cfg.max_steps, cfg.enc_type) == (
        0.9999, 0.5, 400_000, "dinov2-vit-b")
    with pytest.raises(SystemExit):
        repa.parse_args(["--weighting", "logit"])


def test_bench_runs_on_random_data_without_weights():
    out = run_repa("--bench", "2", "--model", "S/2", "--batch-size", "2", "--enc-type",
                   "dinov2-vit-s", "--num-workers", "0", "--resolution", "256")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "img_s" in out.stdout.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# The training state, against closed forms: what two-run comparisons cannot see. One real
# train_step on the demo model, then the optimiser state, the weights and the EMA are checked
# against AdamW's, the clip's and the EMA's formulas, and the random draws against step_seed.
# ---------------------------------------------------------------------------------------------
def demo_run(*flags):
    cfg = demo.parse_args(["--batch-size", "4", "--num-workers", "0",
                           "--results-dir", "/nonexistent", *flags])[0]
    run = repa.start_run(cfg, demo.DemoDataset, demo.demo_encoders)
    data = iter(repa.loader(run.dataset, run.sampler, 0))
    return run, data


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def manual_gradient(run, batches, step=0):
    """The step's gradient, computed by hand: for each micro-batch m, the seed of its slot, the
    posterior sample, the loss of eq. (9) divided by the number of micro-batches; summed."""
    model = copy.deepcopy(run.model)
    for m, (images, moments, labels) in enumerate(batches):
        torch.manual_seed(repa.step_seed(run.cfg.seed, step, m))
        zs = repa.encode(run.encoders, images)
        mean, std = moments.chunk(2, dim=1)
        x = mean + std * torch.randn_like(mean)  # demo: latent_scale 1
        den, align = repa.repa_loss(model, x, labels, zs, run.cfg.path_type, run.cfg.weighting)
        ((den.mean() + run.cfg.proj_coeff * align) / len(batches)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e6])
def test_one_step_is_adamw_on_the_clipped_averaged_gradient(max_grad_norm):
    run, data = demo_run("--grad-accum", "2", "--weight-decay", "0.1", "--lr", "0.01",
                         "--adam-beta1", "0.8", "--adam-beta2", "0.9",
                         "--max-grad-norm", str(max_grad_norm))
    batches = [next(data) for _ in range(2)]
    before = params(run.model)
    grads = manual_gradient(run, batches)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                 for g in grads.values()]))
    stats = repa.train_step(run, batches)
    assert run.step == 1 and stats[2].item() == pytest.approx(norm.item(), rel=1e-4)  # pre-clip
    clip = min(1.0, max_grad_norm / (norm.item() + 1e-6))  # torch's clip_grad_norm_
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.8, 0.9, 1e-8
    state = run.opt.state
    for name, p in run.model.named_parameters():
        if name not in grads:  # pos_embed: frozen
            assert torch.equal(p, before[name])
            continue
        g = grads[name] * clip
        torch.testing.assert_close(state[p]["exp_avg"], (1 - b1) * g, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(state[p]["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-4,
                                   atol=1e-12)
        # AdamW's first step: m_hat = g, v_hat = g^2; decoupled decay first
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6)


def test_ema_is_the_lerp_of_the_formula_every_step():
    run, data = demo_run("--ema-decay", "0.9")
    assert all(torch.equal(a, b) for a, b in zip(run.ema.parameters(), run.model.parameters()))
    ema = params(run.ema)
    for _ in range(2):  # the EMA follows each step: ema <- 0.9 ema + 0.1 model
        repa.train_step(run, [next(data)])
        now = params(run.model)
        ema = {n: 0.9 * ema[n] + 0.1 * now[n] for n in ema}
        for n, p in run.ema.named_parameters():
            torch.testing.assert_close(p, ema[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(run.ema.parameters(),
                                                     run.model.parameters()))


def test_each_micro_batch_draws_from_the_seed_of_its_step_and_slot(monkeypatch):
    run, data = demo_run("--grad-accum", "2", "--seed", "3")
    seen = []
    real = repa.sample_t

    def record(batch, *args, **kw):
        t = real(batch, *args, **kw)
        seen.append(t.clone())
        return t

    monkeypatch.setattr(repa, "sample_t", record)
    batches = [next(data) for _ in range(4)]
    repa.train_step(run, batches[:2])
    repa.train_step(run, batches[2:])
    # by hand: seed (3, step, slot), then the posterior sample (a randn of the image's shape),
    # then t ~ U(0, 1) of the micro-batch (2 images)
    expected = []
    for step, slot in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        torch.manual_seed(repa.step_seed(3, step, slot))
        torch.randn(2, 3, 16, 16)
        expected.append(torch.rand(2))
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    assert len({repa.step_seed(3, s, m) for s in range(100) for m in range(8)}) == 800


def test_projector_learns_nothing_without_the_alignment_term():
    run, data = demo_run("--proj-coeff", "0", "--cfg-prob", "0.2")
    before = params(run.model.projectors)
    repa.train_step(run, [next(data)])
    assert all(torch.equal(p, before[n]) for n, p in run.model.projectors.named_parameters())
    assert run.model.y_embedder.dropout_prob == 0.2  # the flag reaches the label dropout
    assert all(p.grad is None for p in run.model.parameters())  # no gradient left for the next


def test_align_until_stops_the_term_and_the_encoders(monkeypatch):
    run, data = demo_run("--align-until", "1")
    assert repa.train_step(run, [next(data)])[1] < 0  # step 0 aligns
    before = params(run.model)
    monkeypatch.setattr(repa, "encode", lambda *a: pytest.fail("an encoder ran past the stop"))
    stats = repa.train_step(run, [next(data)])
    after = params(run.model)
    assert stats[1] == 0 and torch.isfinite(stats).all()
    moved = {n: not torch.equal(after[n], before[n]) for n in before if after[n].requires_grad}
    assert not any(m for n, m in moved.items() if n.startswith("projectors."))  # no gradient
    assert all(m for n, m in moved.items() if n.startswith("blocks."))


def test_reg_trains_the_class_token_the_demo_encoders_mean_token(monkeypatch):
    run, data = demo_run("--reg")
    assert run.model.pos_embed.shape[1] == 1 + 64 and run.model.final_layer.linear_cls.out_features
    given, loss = [], repa.repa_loss
    monkeypatch.setattr(repa, "repa_loss", lambda *a, **kw: given.append(kw) or loss(*a, **kw))
    batch, before = next(data), params(run.model)
    repa.train_step(run, [batch])
    (patches,) = repa.encode(run.encoders, batch[0])
    torch.testing.assert_close(given[0]["cls"], patches.mean(1))  # it has no CLS token
    assert given[0]["reg_coeff"] == 0.03
    w = "final_layer.linear_cls.weight"  # zero at first, as the official; learned
    assert not before[w].any() and params(run.model)[w].any()
    cfg = demo.parse_args(["--reg", "--results-dir", "/nonexistent"])[0]
    no_cls = lambda device: [dataclasses.replace(e, cls="") for e in demo.demo_encoders(device)]
    with pytest.raises(repa.UserError, match="--reg needs encoders with a class token, and "
                                             "demo-simclr-vit has none"):
        repa.start_run(cfg, demo.DemoDataset, no_cls)


def test_checkpoint_schema_and_data_position(tmp_path):
    run, data = demo_run("--results-dir", str(tmp_path), "--lr", "0.002")
    os.makedirs(run.ckpt_dir)
    repa.resume_run(run)
    repa.train_step(run, [next(data)])
    run.sampler.start = 2 * run.sampler.per_epoch + 5  # as if resumed mid-epoch 2
    repa.save_checkpoint(run, "x.pt")
    ckpt = repa.load_checkpoint(os.path.join(run.ckpt_dir, "x.pt"))
    assert set(ckpt) == {"model", "ema", "opt", "args", "steps", "model_kwargs", "data",
                         "class_names"}
    assert ckpt["class_names"][:2] == ["disk", "ring"]  # the data set's, for sample.py's grids
    # one more global batch consumed than at the start: position 6 of epoch 2
    assert ckpt["steps"] == 1 and ckpt["data"] == {"epoch": 2, "position": 6}
    assert ckpt["args"]["lr"] == 0.002 and ckpt["model_kwargs"] == run.model_kwargs
    assert all(torch.equal(ckpt["ema"][k], v) for k, v in run.ema.state_dict().items())
    # a resume with other optimiser flags continues with them (the README's promise), from the
    # same data position and optimiser state
    again, _ = demo_run("--results-dir", str(tmp_path), "--lr", "0.005", "--weight-decay", "0.01",
                        "--adam-beta1", "0.8", "--adam-beta2", "0.99", "--adam-eps", "1e-6")
    repa.resume_run(again)
    assert again.step == 1 and again.sampler.start == 2 * run.sampler.per_epoch + 6
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in again.opt.param_groups
            ] == [(0.005, 0.01, (0.8, 0.99), 1e-6)]
    assert all(torch.equal(again.opt.state_dict()["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in run.opt.state_dict()["state"].items())


def test_reader_epochs_are_the_seeded_permutations():
    n, b, seed = 100, 5, 3
    it = iter(repa.ResumableBatches(n, b, rank=1, world=2, accum=2, seed=seed))
    per_epoch = n // (4 * b)  # 4 slots of 5 per step: 5 steps per epoch
    for epoch in range(2):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for step in range(per_epoch):
            for slot in (2, 3):  # rank 1's two micro-batches
                begin = (step * 4 + slot) * b
                assert next(it) == order[begin:begin + b]


# ---------------------------------------------------------------------------------------------
# Watching a run, and the first hour of a new user: grids from the EMA with fixed noise, W&B
# offline, a finished run that stays untouched, one-line errors for bad values and files.
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # tens of seconds: CI runs it with the slow tests
def test_grids_are_the_ema_with_fixed_noise_at_step_1_and_every_n(tmp_path):
    from PIL import Image
    args = ["--batch-size", "8", "--sample-every", "2", "--results-dir", str(tmp_path)]
    assert run_demo(*args, "--max-steps", "2").returncode == 0
    assert run_demo(*args, "--max-steps", "4").returncode == 0  # resumed: the same noise
    samples = tmp_path / "demo" / "samples"
    assert sorted(os.listdir(samples)) == ["0000001.png", "0000002.png", "0000004.png"]
    ckpt = repa.load_checkpoint(str(tmp_path / "demo" / "checkpoints" / "0000004.pt"))
    ema = repa.SiT(**ckpt["model_kwargs"])
    repa.load_sit_weights(ema, ckpt["ema"])
    noise = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10).repeat_interleave(4)
    x = sample.sample_ode(ema.eval(), noise, labels, num_steps=50, cfg_scale=4.0)
    images = sample.decode(x, None)
    grid = np.asarray(Image.open(samples / "0000004.png"))
    assert grid.shape == (10 * 66, 56 + 4 * 66, 3)  # every class a row, 4 columns at 64 px
    tile = grid[66 * 3:66 * 3 + 64:4, 56 + 66 * 2:56 + 66 * 2 + 64:4]  # class 3, column 2
    assert np.array_equal(tile, images[3 * 4 + 2].numpy())


@pytest.mark.slow  # tens of seconds: CI runs it with the slow tests
def test_wandb_logs_offline_next_to_metrics(tmp_path):
    pytest.importorskip("wandb")
    out = run_demo(*DEMO_FAST, "--max-steps", "2", "--wandb", "repa-test", "--sample-every", "1",
                   "--results-dir", str(tmp_path),
                   env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [d for d in os.listdir(tmp_path / "demo" / "wandb") if d.startswith("offline-run")]
    files = tmp_path / "demo" / "wandb" / runs[0] / "files"
    assert len(runs) == 1 and len(list(files.rglob("*.png"))) == 2  # the grids of steps 1, 2
    assert len(open(tmp_path / "demo" / "metrics.jsonl").readlines()) == 2  # still the truth


@pytest.mark.slow
def test_a_finished_run_says_so_and_changes_nothing(tmp_path):
    first = run_demo(*DEMO_FAST, "--max-steps", "2", "--results-dir", str(tmp_path))
    assert first.returncode == 0 and "done: 2 steps" in first.stdout
    assert "python sample.py --ckpt" in first.stdout and " eta " in first.stdout
    folder = tmp_path / "demo"
    before = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
              if p.is_file()}
    for steps in ("2", "1"):
        again = run_demo(*DEMO_FAST, "--max-steps", steps, "--results-dir", str(tmp_path))
        assert again.returncode == 0 and again.stdout.count("\n") <= 1, again.stdout
        assert "already at step 2" in again.stdout and "--exp-name" in again.stdout
    # a new run in its folder (--resume none) is refused, not written over it
    again = run_demo(*DEMO_FAST, "--max-steps", "2", "--resume", "none", "--seed", "5",
                     "--results-dir", str(tmp_path))
    assert again.returncode == 2 and "holds a run already" in again.stderr, again.stderr
    after = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
             if p.is_file()}
    assert after == before


@pytest.mark.parametrize("flags,message", [
    (["--model", "XL/3"], "unknown model size 'XL/3'"),
    (["--model", "DiT-B/2", "--path-type", "cosine"], "--path-type and --weighting are SiT's"),
    (["--model", "DiT-B/2", "--weighting", "lognormal"], "trains on its DDPM chain"),
    (["--enc-type", "dinov9-vit-b"], "unknown encoder 'dinov9-vit-b'"),
    (["--lr", "-1"], "--lr must be positive, got -1.0"),
    (["--adam-beta2", "1.5"], "--adam-beta2 must be in [0, 1), got 1.5"),
    (["--ema-decay", "nan"], "--ema-decay must be in [0, 1], got nan"),
    (["--cfg-prob", "1"], "--cfg-prob must be in [0, 1)"),
    (["--batch-size", "10", "--grad-accum", "3"], "--batch-size 10 is not divisible"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--encoder-depth", "29"], "--encoder-depth must be at most 28 for XL/2"),
    (["--model", "XL/4"], "has 64 tokens and the encoder 256 patches: use patch size 2"),
    (["--resolution", "300"], "argument --resolution: invalid choice: 300"),
    (["--align-until", "100", "--proj-coeff", "0"], "--proj-coeff is 0: there is none to stop"),
    (["--spatial-norm", "1.5"], "--spatial-norm must be in [0, 1], got 1.5"),
    (["--spatial-norm", "-0.1"], "--spatial-norm must be in [0, 1], got -0.1"),
    (["--projector-kernel", "2"], "--projector-kernel must be odd (the grid keeps its size)"),
    (["--projector", "attn"], "argument --projector: invalid choice: 'attn'"),
    (["--reg", "--model", "DiT-B/2"], "--reg does not combine with DiT-B/2: REG trains a SiT"),
    (["--reg", "--align-until", "9"], "--reg does not combine with --align-until"),
    (["--reg", "--enc-type", "jepa-vit-h=x.pth"], "--reg needs an encoder with a class token, "
                                                  "and jepa-vit-h has none"),
    (["--reg-coeff", "-1"], "--reg-coeff must be at least 0, got -1.0")])
def test_bad_values_are_one_line_before_any_data_is_read(flags, message, capsys):
    # the default --data-dir does not exist: the value must be named, not the missing dataset
    code, out, err = cli(capsys, *flags)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and out == ""


def test_bad_checkpoint_files_are_one_sentence(tmp_path):
    good = tmp_path / "good.pt"
    repa.write_checkpoint(str(good), {"model": {"w": torch.zeros(1000)}})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "text.pt").write_text("these are my notes, not weights\n" * 20)
    for name in ["cut.pt", "text.pt"]:
        says = "is not a whole torch.save file"
        with pytest.raises(repa.UserError) as e:
            repa.load_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert says in msg and "\n" not in msg
        out = run_demo(*DEMO_FAST, "--max-steps", "1", "--resume", str(tmp_path / name),
                       "--results-dir", str(tmp_path / "r"))
        assert out.returncode == 2 and says in out.stderr and out.stderr.count("\n") == 1


def test_help_shows_defaults(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "--lr LR" in out and "(default 0.0001)" in " ".join(out.split())
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--mode", "''"), ("--cfg-scale", "1.8"), ("--guidance-low", "0.0"),
                          ("--guidance-high", "-1.0"), ("--per-class", "4")]:
        entry = f"{flag} {flag[2:].replace('-', '_').upper()} "  # the help entry, not the usage
        assert f"(default {default})" in text.split(entry)[-1][:300], flag


def test_readme_library_snippet_runs_as_pasted():
    readme = open(os.path.join(HERE, "README.md")).read()
    snippet = readme.split("## Use it in your code", 1)[1].split("```python\n", 1)[1]
    snippet = snippet.split("```", 1)[0]
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["loss"].ndim == 0 and math.isfinite(namespace["loss"].item())


def test_dit_trains_with_the_ddpm_loss_and_samples_with_ddpm(tmp_path, monkeypatch, capsys):
    # train_step takes the objective from the model (a DiT: the hybrid loss, with REPA's term);
    # the training grids and sample.py take DiT's sampler, with guidance on every step
    seen, ddpm_loss, ddpm = [], repa.ddpm_loss, sample.sample_ddpm
    monkeypatch.setattr(repa, "ddpm_loss", lambda *a, **k: seen.append(len(a[3])) or ddpm_loss(
        *a, **k))
    monkeypatch.setattr(repa, "repa_loss", None)  # not called for a DiT
    run = demo.train_demo(demo.parse_args([*DEMO_FAST, "--model", "DiT-T/2", "--max-steps", "2",
                                           "--results-dir", str(tmp_path), "--align-every", "2",
                                           "--align-images", "20"])[0])
    assert seen == [1, 1] and run.model_kwargs["learn_sigma"] and run.model.learn_sigma
    # the demo's measurement samples a DiT with its DDPM chain (an ODE on eps would not run)
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "fd_demo" in r] == [2]
    assert "DiT 2,001,272 parameters" in capsys.readouterr().out
    record = lambda *a, **k: seen.append(a[3:] + tuple(k.values())) or ddpm(*a, **k)
    monkeypatch.setattr(repa, "sample_ddpm", record)
    assert os.path.isfile(repa.grid_writer(run, per_class=1, num_steps=3)())
    # guided on every step (the default interval [0, 1]) at the grids' CFG 4, with seeded noise
    assert seen[-1][:2] == (3, 4.0) and isinstance(seen[-1][2], torch.Generator)
    monkeypatch.setattr(sample, "sample_ddpm", record)
    sample.main(["--ckpt", str(tmp_path / "demo"), "--num-steps", "3", "--per-class", "1",
                 "--sample-dir", str(tmp_path)])
    assert seen[-1][:4] == (3, 1.8, 0.0, 1.0)
    assert [p for p in os.listdir(tmp_path) if "-ddpm3-cfg1.8-0.0-1.0-" in p]
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "demo"), "--mode", "sde"])
    assert "it samples with --mode ddpm" in capsys.readouterr().err


# =============================================================================================
# sample.py
#   1. Given the exact velocity of a Gaussian data distribution, the ODE lands on the target (Euler
#      first order, Heun second order) and the SDE reaches its mean and covariance within sampling
#      error, for the linear and the cosine path.
#   2. Guidance switches on and off at the right t, with the null label num_classes, as
#      uncond + w (cond - uncond).
#   3. All eight official sampler runs (ODE Euler/Heun, SDE; with and without CFG and interval;
#      both paths) are reproduced to 1e-5, with the same model calls and the same RNG draws.
#   4. End to end: checkpoints in three layouts load; 2 gloo processes write PNGs and an .npz,
#      and a restart redoes only what is missing, bit for bit; a pixel-space grid; one-line errors.
# =============================================================================================
# ---------------------------------------------------------------------------------------------
# Samplers on a known target: data ~ N(mu, diag(s^2)). Then x_t ~ N(alpha mu, V) per dimension
# with V = alpha^2 s^2 + sigma^2, and the exact velocity E[v | x_t = x] is
#     v(x, t) = alpha' mu + (alpha alpha' s^2 + sigma sigma') (x - alpha mu) / V,
# the time derivative of the affine map x_t = alpha mu + sqrt(V) xi. Its flow carries noise z
# (t = 1) to mu + s z (t = 0) exactly, so the ODE can be checked sample by sample.
# ---------------------------------------------------------------------------------------------
MU = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64).view(1, 4, 1, 1)


class GaussianVelocity(torch.nn.Module):
    """The model's call signature, (x, t, y) -> (v, []), with the closed-form velocity."""
    num_classes = 10

    def __init__(self, path_type):
        super().__init__()
        self.path_type = path_type

    def forward(self, x, t, y):
        a, s, da, ds = repa.interpolant(t.double().view(-1, 1, 1, 1), self.path_type)
        var = a ** 2 * STD ** 2 + s ** 2
        v = da * MU + (a * da * STD ** 2 + s * ds) * (x - a * MU) / var
        return v.to(x.dtype), []


def whitened_noise(n, seed=0):
    """n samples whose empirical mean is 0 and covariance I exactly, shaped (n, 4, 1, 1)."""
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T.reshape(n, 4, 1, 1)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_carries_noise_to_gaussian_target(path_type):
    z = whitened_noise(4096)  # float64 latents: the model sees float64 x and t
    y = torch.zeros(4096, dtype=torch.long)
    x = sample.sample_ode(GaussianVelocity(path_type), z, y, num_steps=100, heun=True,
                          path_type=path_type)
    assert x.dtype == torch.float64
    flat = x.view(-1, 4)
    # the exact flow is affine per dimension, so exact input moments give exact target moments
    torch.testing.assert_close(flat.mean(0), MU.view(4), rtol=0, atol=1e-3)
    torch.testing.assert_close(torch.cov(flat.T), torch.diag(STD.view(4) ** 2), rtol=0, atol=1e-3)
    torch.testing.assert_close(x, MU + STD * z, rtol=0, atol=1e-3)  # and sample by sample


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_euler_is_first_order_and_heun_second_order(path_type):
    z, y = whitened_noise(256), torch.zeros(256, dtype=torch.long)
    model = GaussianVelocity(path_type)

    def error(steps, heun):
        x = sample.sample_ode(model, z, y, num_steps=steps, heun=heun)
        return (x - (MU + STD * z)).abs().max().item()

    # halving the step halves Euler's error and quarters Heun's (its last step is Euler, whose
    # local error is also O(h^2), so the order stays 2)
    assert 1.8 < error(50, False) / error(100, False) < 2.2
    assert 3.5 < error(50, True) / error(100, True) < 4.5
    assert error(100, True) < 1e-3 < error(100, False)


def sde_moment_errors(velocity_path, score_path, n=8000, steps=200):
    """The largest |error| / standard error over the SDE output's means, variances and
    covariances. Standard errors: s / sqrt(n) for a mean, s^2 sqrt(2 / n) for a variance and
    s_i s_j / sqrt(n) for a covariance."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64)
    x = sample.sample_sde(GaussianVelocity(velocity_path), z, torch.zeros(n, dtype=torch.long),
                          num_steps=steps, path_type=score_path, generator=g).view(n, 4)
    std, cov = STD.view(4), torch.cov(x.T)
    mean = (x.mean(0) - MU.view(4)).abs() / (std / math.sqrt(n))
    var = (cov.diagonal() / std ** 2 - 1).abs() / math.sqrt(2 / n)
    off = (cov - torch.diag(cov.diagonal())).abs() / (std[:, None] * std[None] / math.sqrt(n))
    return max(mean.max().item(), var.max().item(), off.max().item())


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_reaches_gaussian_moments(path_type):
    # n = 8000 x 4 numbers: below torch's threshold for multithreading, fast on a busy CPU. The
    # solver's own biases are below one standard error here: the noise stops at t = 0.04 (a
    # posterior variance of ~0.0017 is left), and on the cosine path the last mean step leaves a
    # bias of about (1 - alpha_0.04) mu, as in the official sampler.
    assert sde_moment_errors(path_type, path_type) < 5
    # and the check has teeth: the score of the other path (a wrong drift) fails it by far
    assert sde_moment_errors(path_type, {"linear": "cosine", "cosine": "linear"}[path_type]) > 20


def test_sde_generator_equals_seeded_global_rng():
    model, z, y = GaussianVelocity("linear"), whitened_noise(64), torch.zeros(64, dtype=torch.long)
    torch.manual_seed(5)
    a = sample.sample_sde(model, z, y, num_steps=10)
    state = torch.get_rng_state()
    b = sample.sample_sde(model, z, y, num_steps=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())  # global RNG untouched


# ---------------------------------------------------------------------------------------------
# Guidance: on only inside [guidance_low, guidance_high] (both ends included), decided at t_cur
# for Heun's corrector; null label = num_classes; result = uncond + w (cond - uncond).
# ---------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """Returns v = label id everywhere and records (batch, t, labels) of each call."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        assert x.dtype == t.dtype == torch.float32 and (t == t[0]).all()
        self.calls.append((x.shape[0], round(t[0].item(), 6), y.tolist()))
        return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone(), []


def test_velocity_combines_cond_and_null():
    model, x, y = Recorder(), torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([3, 5])
    v = sample.velocity(model, x, 0.5, y, cfg_scale=1.5)
    assert model.calls == [(4, 0.5, [3, 5, 10, 10])]  # [cond; null], null = num_classes, not 1000
    expected = 10 + 1.5 * (torch.tensor([3.0, 5.0]) - 10)
    assert v.dtype == torch.float64 and torch.equal(v[:, 0, 0, 0], expected.double())
    assert torch.equal(sample.velocity(model, x, 0.5, y, cfg_scale=1.0)[:, 0, 0, 0],
                       torch.tensor([3.0, 5.0], dtype=torch.float64))  # cfg 1: no null call


def test_guidance_interval_switches_at_the_right_t():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([3, 5])
    model = Recorder()
    sample.sample_ode(model, x, y, num_steps=5, heun=True, cfg_scale=1.5, guidance_low=0.2,
                      guidance_high=0.7)
    # (t, guided) of each call: predictor at t_cur, corrector at t_next decided at t_cur; the
    # corrector into 0.6 follows t_cur = 0.8 (unguided); 0.2 is inside [0.2, 0.7]
    assert [(t, b == 4) for b, t, _ in model.calls] == [
        (1.0, False), (0.8, False), (0.8, False), (0.6, False), (0.6, True), (0.4, True),
        (0.4, True), (0.2, True), (0.2, True)]
    assert all(labels == [3, 5, 10, 10] for b, _, labels in model.calls if b == 4)
    model = Recorder()
    sample.sample_sde(model, x, y, num_steps=5, cfg_scale=1.8, guidance_low=0.0,
                      guidance_high=0.7)  # the paper's interval on the grid 1, .76, .52, .28, .04
    assert [(t, b == 4) for b, t, _ in model.calls] == [
        (1.0, False), (0.76, False), (0.52, True), (0.28, True), (0.04, True)]
    model = Recorder()
    sample.sample_ode(model, x, y, num_steps=5, cfg_scale=3.0, guidance_low=0.4, guidance_high=0.4)
    assert [b for b, _, _ in model.calls] == [2, 2, 2, 4, 2]  # a point interval, inclusive


# ---------------------------------------------------------------------------------------------
# Golden: the official euler_sampler / euler_maruyama_sampler on the tiny filled model, latents
# from seed 4, y = [3, 5], torch.manual_seed(5) before each call, 5 steps. checks() of the
# output, the batch of each model call (4 = guided), and the number of randn draws.
# ---------------------------------------------------------------------------------------------
ODE_CALL_T = {False: [1.0, 0.8, 0.6, 0.4, 0.2], True: [1.0, 0.8, 0.8, 0.6, 0.6, 0.4, 0.4, 0.2, 0.2]}
SDE_CALL_T = [1.0, 0.76, 0.52, 0.28, 0.04]
SAMPLER_GOLDEN = {
    'ode_euler_cfg1': dict(
        solver='ode', heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
        path_type='linear', batches=[2, 2, 2, 2, 2], n_randn=0,
        out=dict(sum=72.14167474177665, sumsq=918.0312049647519, wsum=-11.831680749127386,
                 first=[-0.36472703814506524, 0.698860454559326, -0.3499200738966465,
                        0.026925592124462133, 0.6100190952420235, 0.38724756240844727])),
    'ode_heun_cfg1': dict(
        solver='ode', heun=True, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
        path_type='linear', batches=[2, 2, 2, 2, 2, 2, 2, 2, 2], n_randn=0,
        out=dict(sum=69.12490045768209, sumsq=924.2424114149604, wsum=-13.599581920366035,
                 first=[-0.3392477065324784, 0.7410391569137572, -0.30525910314172505,
                        0.11740511804819108, 0.5983603790402412, 0.472902062535286])),
    'ode_euler_cfg1.5_0_1': dict(
        solver='ode', heun=False, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
        path_type='linear', batches=[4, 4, 4, 4, 4], n_randn=0,
        out=dict(sum=72.26349230795167, sumsq=927.1106734135874, wsum=-10.573145955204025,
                 first=[-0.37733578383922584, 0.6452164649963379, -0.341724806651473,
                        0.05808240473270417, 0.6701268568634986, 0.45665580183267596])),
    'ode_heun_cfg1.5_0.2_0.7': dict(
        solver='ode', heun=True, cfg_scale=1.5, guidance_low=0.2, guidance_high=0.7,
        path_type='linear', batches=[2, 2, 2, 2, 4, 4, 4, 4, 4], n_randn=0,
        out=dict(sum=68.87379200798459, sumsq=928.3623606402875, wsum=-12.935884185612226,
                 first=[-0.3391576677560806, 0.7119437247514724, -0.28247501645237205,
                        0.14512022808194164, 0.651274611055851, 0.5160883277654648])),
    'ode_heun_cfg1.5_0_1_cosine': dict(
        solver='ode', heun=True, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0,
        path_type='cosine', batches=[4, 4, 4, 4, 4, 4, 4, 4, 4], n_randn=0,
        out=dict(sum=69.26971183256245, sumsq=933.363525600964, wsum=-12.525933819604537,
                 first=[-0.34937391132116324, 0.6845543265342712, -0.29235296994447707,
                        0.15466789528727531, 0.6618720635771751, 0.546498716622591])),
    'sde_cfg1': dict(
        solver='sde', heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
        path_type='linear', batches=[2, 2, 2, 2, 2], n_randn=4,
        out=dict(sum=86.7994006722302, sumsq=693.6176244807281, wsum=-10.89076529036706,
                 first=[1.8213420583127242, 0.3008722464688798, 0.5311631717849749,
                        -0.04242640134986328, 1.3517252267879254, 0.1976906072574014])),
    'sde_cfg1.8_0_0.7': dict(
        solver='sde', heun=False, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7,
        path_type='linear', batches=[2, 2, 4, 4, 4], n_randn=4,
        out=dict(sum=88.00022021771665, sumsq=702.7221727824791, wsum=-10.790372516408246,
                 first=[1.8728023896529646, 0.305766011844185, 0.6852102754883744,
                        0.09351120099156728, 1.5309992480429913, 0.28642002264473043])),
    'sde_cfg1.8_0_1_cosine': dict(
        solver='sde', heun=False, cfg_scale=1.8, guidance_low=0.0, guidance_high=1.0,
        path_type='cosine', batches=[4, 4, 4, 4, 4], n_randn=4,
        out=dict(sum=100.47958858263766, sumsq=1064.0089643639808, wsum=-8.845435770665674,
                 first=[2.024710880290387, 0.24768198194429572, 0.7192445903481892,
                        -0.17551778509092436, 1.9722951356765257, 0.11851561304411937])),
}


@pytest.mark.parametrize("name", list(SAMPLER_GOLDEN))
def test_samplers_equal_official(name, monkeypatch):
    spec = dict(SAMPLER_GOLDEN[name])
    solver = sample.sample_ode if spec.pop("solver") == "ode" else sample.sample_sde
    batches, n_randn, expected = spec.pop("batches"), spec.pop("n_randn"), spec.pop("out")
    model = fill_(tiny_model()).eval()
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 5])
    events, randn, forward = [], torch.randn, model.forward

    def traced_randn(*args, **kw):
        events.append(("randn", None, None))
        out = randn(*args, **kw)
        assert out.dtype == torch.float64 and out.shape == z.shape
        return out

    def traced_forward(x, t, labels):
        events.append(("model", x.shape[0], t[0].item()))
        assert x.dtype == t.dtype == torch.float32
        return forward(x, t, labels)

    monkeypatch.setattr(torch, "randn", traced_randn)
    monkeypatch.setattr(model, "forward", traced_forward)
    torch.manual_seed(5)
    out = solver(model, z, y, num_steps=5, **spec)
    assert out.dtype == torch.float64 and out.shape == z.shape
    assert_golden(out, expected)
    calls = [(b, t) for kind, b, t in events if kind == "model"]
    times = ODE_CALL_T[spec["heun"]] if solver is sample.sample_ode else SDE_CALL_T
    assert [b for b, _ in calls] == batches
    assert [t for _, t in calls] == torch.tensor(times, dtype=torch.float32).tolist()
    # the SDE draws before each noisy step's model call, and not for the last step
    kinds = [kind for kind, _, _ in events]
    assert kinds == (["randn", "model"] * n_randn + ["model"] if n_randn else
                     ["model"] * len(calls))


# ---------------------------------------------------------------------------------------------
# DiT's sampler: the official p_sample_loop as DiT's sample_ddp.py calls it (clip_denoised
# False) on the tiny DiT, 5 / 10 / 25 respaced steps and CFG 1.5 in the standard form, with the
# recorded noise replayed through torch.randn_like as in the golden run (see GOLDEN_DIT).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,cfg_scale", list(GOLDEN_DIT["sampler"]))
def test_ddpm_sampler_equals_official(steps, cfg_scale, monkeypatch):
    model = tiny_dit()
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 5])
    recorded = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(100 + n))
                for n in range(steps)]
    events, forward = [], model.forward

    def replayed_randn_like(x):
        assert x.shape == z.shape and x.dtype == torch.float32
        events.append("noise")
        return recorded[events.count("noise") - 1]

    def traced_forward(x, t, labels):
        events.append((x.shape[0], t.dtype, *set(t.tolist())))
        return forward(x, t, labels)

    monkeypatch.setattr(torch, "randn_like", replayed_randn_like)
    monkeypatch.setattr(model, "forward", traced_forward)
    out = sample.sample_ddpm(model, z, y, steps, cfg_scale)
    # the samples of the untrained model are large (|x| up to ~500): relative tolerance
    torch.testing.assert_close(torch.tensor(checks(out), dtype=torch.float64), torch.tensor(
        GOLDEN_DIT["sampler"][(steps, cfg_scale)], dtype=torch.float64), rtol=1e-5, atol=1e-3)
    # each step calls the model at the ORIGINAL timestep (int64; batch 4 = guided), then draws
    # its noise: num_steps draws, the last one masked
    batch = 4 if cfg_scale > 1 else 2
    assert events == [e for k in GOLDEN_DIT["kept"][steps][::-1]
                      for e in [(batch, torch.int64, k), "noise"]]


def test_ddpm_guidance_interval_is_read_on_the_original_timesteps(monkeypatch):
    # respaced to 10 steps, step i calls the model at k = kept[i]; guidance is on while k / 1000
    # is in [0, 0.5] (not i / 10): the guided calls are the doubled batches
    model, batches = tiny_dit(), []
    forward = model.forward
    monkeypatch.setattr(model, "forward",
                        lambda x, t, y: batches.append(len(x)) or forward(x, t, y))
    sample.sample_ddpm(model, torch.randn(2, 4, 8, 8), torch.tensor([3, 5]), 10, cfg_scale=4,
                       guidance_high=0.5)
    kept = repa.space_timesteps(10)
    assert batches == [4 if k / 1000 <= 0.5 else 2 for k in reversed(kept)]
    assert 2 in batches and 4 in batches


def test_ddpm_sampler_generator_equals_seeded_global_rng():
    model, z, y = tiny_dit(), torch.randn(2, 4, 8, 8), torch.tensor([3, 5])
    torch.manual_seed(7)
    a = sample.sample_ddpm(model, z, y, 5, cfg_scale=2.0, guidance_high=0.5)
    b = sample.sample_ddpm(model, z, y, 5, cfg_scale=2.0, guidance_high=0.5,
                           generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Checkpoints, files and the command line: three layouts load, a 2-process FID run writes PNGs
# and an .npz and resumes exactly, a pixel-space grid, and one-line errors.
# ---------------------------------------------------------------------------------------------
def save_ours(path, class_names=None, **model_kwargs):
    kwargs = {**TINY, "z_dims": [32], "num_classes": 10, **model_kwargs}
    model = fill_(repa.SiT(**kwargs))
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}  # distinguishable from "model"
    torch.save({"model": model.state_dict(), "ema": ema, "opt": {}, "steps": 7,
                "args": {"path_type": "linear", "resolution": 16, "enc_type": "dinov2-vit-b"},
                "model_kwargs": kwargs, **({"class_names": class_names} if class_names else {})},
               path)
    return model, ema


def test_checkpoint_layouts_load(tmp_path):
    import argparse
    model, ema = save_ours(tmp_path / "ours.pt")
    loaded, info = sample.load_checkpoint(str(tmp_path / "ours.pt"))
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())
    assert info["format"] == "ours" and info["steps"] == 7 and not info["pixel_space"]
    raw, _ = sample.load_checkpoint(str(tmp_path / "ours.pt"), use_ema=False)
    assert torch.equal(raw.final_layer.linear.weight, model.final_layer.linear.weight)
    # the official layout: args is an argparse.Namespace; the encoder widths come from the weights
    official = repa.SiT(**repa.SIZES["S/8"], input_size=4, num_classes=10, z_dims=[24, 40])
    args = argparse.Namespace(model="SiT-S/8", resolution=32, encoder_depth=4, num_classes=10,
                              qk_norm=False, path_type="cosine", enc_type="a,b", cfg_prob=0.1)
    torch.save({"model": official.state_dict(), "ema": official.state_dict(), "opt": {},
                "args": args, "steps": 3}, tmp_path / "official.pt")
    loaded, info = sample.load_checkpoint(str(tmp_path / "official.pt"))
    assert info["format"] == "official" and info["path_type"] == "cosine"
    assert [p[-1].out_features for p in loaded.projectors] == [24, 40] and not loaded.reg
    with pytest.raises(repa.UserError, match="disagrees with the checkpoint"):
        sample.load_checkpoint(str(tmp_path / "official.pt"), model="B/8")
    # the official REG's: its class-token layers say so
    reg = repa.SiT(**repa.SIZES["S/8"], input_size=4, num_classes=10, z_dims=[24], reg=True)
    torch.save({"ema": reg.state_dict(), "args": args}, tmp_path / "reg.pt")
    assert sample.load_checkpoint(str(tmp_path / "reg.pt"))[0].reg
    # a plain state dict with the legacy decoder_blocks naming of the released last.pt
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - 4}.{k.split('.', 2)[2]}"
               if k.startswith("blocks.") and int(k.split(".")[1]) >= 4 else k): v
              for k, v in official.state_dict().items()}
    torch.save(legacy, tmp_path / "last.pt")
    loaded, info = sample.load_checkpoint(str(tmp_path / "last.pt"), model="S/8", resolution=32,
                                          encoder_depth=4)
    assert info["format"] == "plain" and loaded.num_classes == 10
    assert torch.equal(loaded.blocks[11].mlp.fc2.bias, official.blocks[11].mlp.fc2.bias)
    # a wrong size is one clear line
    with pytest.raises(repa.UserError) as e:
        sample.load_checkpoint(str(tmp_path / "last.pt"), model="S/4", resolution=32,
                               encoder_depth=4)
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)


def test_official_checkpoint_without_label_dropout_loads(tmp_path):
    import argparse
    model = fill_(tiny_model(class_dropout_prob=0.0))  # 1000 label rows, no null row
    args = argparse.Namespace(model="SiT-XL/2", resolution=64, encoder_depth=2, num_classes=1000,
                              qk_norm=False, path_type="linear", cfg_prob=0.0)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": args,
                "steps": 1}, tmp_path / "official.pt")
    small = dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, encoder_depth=2)
    with pytest.MonkeyPatch.context() as mp:  # a tiny "XL/2", so the test stays small
        mp.setitem(repa.SIZES, "XL/2", small)
        loaded, info = sample.load_checkpoint(str(tmp_path / "official.pt"))
    assert loaded.y_embedder.embedding_table.num_embeddings == 1000 and info["format"] == "official"


def test_plain_official_dit_state_dict_loads(tmp_path):
    # DiT-XL-2-256x256.pt is a plain state dict: the learned variance shows in the final layer's
    # width (2 p^2 C), and there are no projectors
    dit, sit = tiny_dit(), fill_(tiny_model(z_dims=()))
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    torch.save(sit.state_dict(), tmp_path / "sit.pt")
    small = dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, encoder_depth=2)
    with pytest.MonkeyPatch.context() as mp:  # tiny "XL/2" sizes, so the test stays small
        mp.setitem(repa.SIZES, "XL/2", small)
        mp.setitem(repa.SIZES, "DiT-XL/2", dict(small, learn_sigma=True))
        loaded, info = sample.load_checkpoint(str(tmp_path / "dit.pt"), resolution=64)
        with pytest.raises(repa.UserError, match="is a DiT .*: use --model DiT-XL/2"):
            sample.load_checkpoint(str(tmp_path / "dit.pt"), model="XL/2", resolution=64)
        with pytest.raises(repa.UserError, match="is a SiT, not a DiT-XL/2: use --model XL/2"):
            sample.load_checkpoint(str(tmp_path / "sit.pt"), model="DiT-XL/2", resolution=64)
    assert info["format"] == "plain" and loaded.learn_sigma and len(loaded.projectors) == 0
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in dit.state_dict().items())


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: checkpoint {tmp_path / 'none.pt'} not found\n"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(repa.UserError, match="is not a whole torch.save file"):
        sample.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(repa.UserError, match="--cls-cfg-scale must be at least 0, or -1"):
        sample.parse_args(["--ckpt", "x.pt", "--cls-cfg-scale", "-2"])


def test_pixel_space_grid(tmp_path, capsys):
    from PIL import Image
    names = [f"shape {c}" for c in range(10)]  # stored by a data set that names its classes
    save_ours(tmp_path / "demo.pt", names, in_channels=3, input_size=16, patch_size=4)
    argv = ["--ckpt", str(tmp_path / "demo.pt"), "--sample-dir", str(tmp_path), "--num-steps",
            "8"]
    sample.main(argv)
    (path,) = [p for p in os.listdir(tmp_path) if p.endswith("-grid.png")]
    grid = np.asarray(Image.open(tmp_path / path))
    # every class of the 10 is a row (named, by the checkpoint's names), 4 columns of 16 px
    # images shown at 64 px, a 56 px margin for the names
    assert grid.shape == (10 * 66, 56 + 4 * 66, 3)
    assert (grid[:, :56] < 128).any()  # the class names are written in the margin
    # the tiles are the sampler's images: the same seed and recipe, decoded without a VAE
    device = repa.setup_distributed()[2]  # where main() ran: the GPU if there is one
    model, info = sample.load_checkpoint(str(tmp_path / "demo.pt"), device)
    assert [info["class_names"][c] for c in (0, 3)] == ["shape 0", "shape 3"]
    labels = torch.arange(10, device=device).repeat_interleave(4)
    solver = sample.Solver("sde", 8, cfg_scale=1.8, guidance_high=0.7, path_type="linear")
    generator = torch.Generator(device).manual_seed(0)  # one stream, chunk after chunk of 32
    images = torch.cat([sample.generate(model, None, chunk, generator, solver, info["input_size"])
                        for chunk in labels.split(32)])
    assert np.array_equal(grid[66 * 2:66 * 2 + 64:4, 56 + 66:56 + 66 + 64:4], images[9].numpy())
    assert torch.is_grad_enabled()  # main() left no global state behind
    sample.main(argv + ["--classes", "1,2", "--per-class", "2"])  # another grid, another file
    grids = sorted(p for p in os.listdir(tmp_path) if p.endswith("-grid.png"))
    assert len(grids) == 2 and grids[0].endswith("-classes1_2-x2-grid.png")
    with pytest.raises(SystemExit) as e:  # a file where the folder must be: one line
        sample.main(argv[:2] + ["--sample-dir", str(tmp_path / "demo.pt"), "--num-steps", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == f"error: a file is where a folder must be: {tmp_path / 'demo.pt'}\n"


def run_cli(args, env=None, nproc=None):
    """sample.py in fresh processes: one, or `nproc` gloo ranks under torchrun."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else []
    # CPUs only (gloo), also on a GPU machine: two ranks cannot share one GPU under NCCL
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    return subprocess.run([sys.executable, *launcher, os.path.join(HERE, "sample.py"), *args],
                          capture_output=True, text=True, cwd=HERE, env=env, timeout=300)


def test_a_damaged_sample_png_is_one_line_that_says_what_to_do(tmp_path):
    for i in range(3):
        sample.save_png(torch.full((8, 8, 3), 40 * i, dtype=torch.uint8), f"{tmp_path}/{i:06d}.png")
    path = tmp_path / "000001.png"
    path.write_bytes(path.read_bytes()[:30])  # cut short after our atomic write
    with pytest.raises(repa.UserError, match="000001.png cannot be read .*: delete it"):
        sample.write_npz(str(tmp_path), 3)


@pytest.mark.slow
def test_fid_run_on_two_processes_writes_npz_and_resumes(tmp_path):
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)  # a tiny random SD-VAE shape: 16 x 16 images <-> 8 x 8 x 4 latents
    AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    save_ours(tmp_path / "ckpt.pt")
    args = ["--ckpt", str(tmp_path / "ckpt.pt"), "--vae", str(tmp_path / "vae"),
            "--num-fid-samples", "10", "--per-proc-batch-size", "4", "--num-steps", "4",
            "--sample-dir", str(tmp_path / "out")]
    out = run_cli(args, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    npz = tmp_path / "out" / f"{folder.name}.npz"
    pngs = sorted(p.name for p in folder.iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(10)]  # 2 ranks x 2 batches x 4, 6 dropped
    first = np.load(npz)["arr_0"]
    assert first.shape == (10, 16, 16, 3) and first.dtype == np.uint8
    assert len({first[i].tobytes() for i in range(10)}) == 10  # every image its own noise
    # a restart after a "kill": the npz and images 3 (rank 1) and 8 (rank 0) are gone
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    for name in ("000003.png", "000008.png"):
        (folder / name).unlink()
    npz.unlink()
    out = run_cli(args, nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 of 10 images on disk, sampling 2 batches" in out.stdout
    for p in folder.iterdir():
        mtime, data = before[p.name]
        assert p.read_bytes() == data  # the same images again: seeds do not depend on history
        assert (p.stat().st_mtime_ns == mtime) == (p.name not in ("000003.png", "000008.png"))
    assert np.array_equal(np.load(npz)["arr_0"], first)


def test_no_vae_offline_is_one_line(tmp_path):
    save_ours(tmp_path / "ckpt.pt")
    out = run_cli(["--ckpt", str(tmp_path / "ckpt.pt"), "--sample-dir", str(tmp_path)],
                  env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith("error: cannot load the VAE stabilityai/sd-vae-ft-ema: ")
    assert out.stderr.count("\n") == 1 and "not in the Hugging Face cache" in out.stderr


# ---------------------------------------------------------------------------------------------
# Measuring alignment: CKNNA and mutual k-NN equal the PRH code's numbers; CKNNA is 1 for a
# rotated copy and about 0 for unrelated features; the probe learns what is linearly there and
# nothing else; the hidden states are the blocks' outputs; --analyze and --align-every run.
# ---------------------------------------------------------------------------------------------
# From github.com/minyoungg/platonic-rep metrics.py @ dcd76ba (AlignmentMetrics.cknna and
# .mutual_knn), float32, CPU, one thread, on the inputs of `prh_inputs`; "l2": both inputs
# F.normalize'd first, as its measure_alignment.compute_score does.
PRH_GOLDEN = {
    "raw": {"cknna_a_b_k10": 0.036858269183114974, "mutual_knn_a_b_k10": 0.051500000059604645,
            "cknna_a_c_k10": 0.5225153128384835, "mutual_knn_a_c_k10": 0.4790000021457672,
            "cknna_a_c_k5": 0.41388557734046877, "mutual_knn_a_c_k5": 0.4200000464916229,
            "cknna_a_a_k10": 0.9999998244872879},
    "l2": {"cknna_a_b_k10": 0.04079686364326012, "mutual_knn_a_b_k10": 0.0494999997317791,
           "cknna_a_c_k10": 0.5225591415196322, "mutual_knn_a_c_k10": 0.48099997639656067,
           "cknna_a_c_k5": 0.4277471164449633, "mutual_knn_a_c_k5": 0.4230000376701355,
           "cknna_a_a_k10": 0.9998221008423902}}


def prh_inputs():
    """a and b independent; c a rotated, noisy copy of a (the golden recipe)."""
    a = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    b = torch.randn(200, 48, generator=torch.Generator().manual_seed(1))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))
    c = a @ q + 0.5 * torch.randn(200, 32, generator=torch.Generator().manual_seed(3))
    return a, b, c


@pytest.mark.parametrize("norm", ["raw", "l2"])
def test_cknna_equals_the_prh_code(norm):
    prep = (lambda x: torch.nn.functional.normalize(x, dim=-1)) if norm == "l2" else (lambda x: x)
    a, b, c = map(prep, prh_inputs())
    golden = PRH_GOLDEN[norm]
    for name, x, y, k in [("a_b_k10", a, b, 10), ("a_c_k10", a, c, 10), ("a_c_k5", a, c, 5)]:
        assert abs(repa.cknna(x, y, k) - golden[f"cknna_{name}"]) < 1e-6, name
        mutual = (repa.knn_mask(x @ x.T, k) * repa.knn_mask(y @ y.T, k)).sum(1).mean() / k
        assert abs(mutual - golden[f"mutual_knn_{name}"]) < 1e-6, name  # the PRH's k-NN
    assert abs(repa.cknna(a, a, 10) - golden["cknna_a_a_k10"]) < 1e-6


def test_cknna_is_one_for_a_rotation_and_near_zero_for_independent_features():
    a, b, _ = prh_inputs()
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(5)))
    # raw features: HSIC is large, so the 1e-6 of the denominator is invisible
    assert abs(repa.cknna(a, 3 * a @ q) - 1) < 1e-6
    # normalised: exactly HSIC / (HSIC + 1e-6), the PRH code's epsilon, written out
    x = torch.nn.functional.normalize(a.double(), dim=-1)
    mask = repa.knn_mask(x @ x.T, 10)
    hsic = repa.hsic_unbiased(mask * (x @ x.T), mask * (x @ x.T)).item()
    assert abs(repa.cknna(x, x @ q.double()) - hsic / (hsic + 1e-6)) < 1e-9
    assert abs(repa.cknna(a, b)) < 0.1 and abs(repa.cknna(a, torch.randn(200, 8))) < 0.1
    with pytest.raises(repa.UserError):
        repa.cknna(a, b, topk=1)


def test_hsic_unbiased_is_song_eq5_by_hand():
    k = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)).double()
    l = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)).double()  # not symmetric
    kt, lt, m = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0), 6
    one = torch.ones(m, 1, dtype=torch.float64)
    expected = (torch.trace(kt @ lt) + (one.T @ kt @ one) * (one.T @ lt @ one) / ((m - 1) * (m - 2))
                - 2 / (m - 2) * (one.T @ kt @ lt @ one)) / (m * (m - 3))
    assert abs(repa.hsic_unbiased(k, l).item() - expected.item()) < 1e-12


def test_knn_masks_on_a_hand_made_case():
    def unit(*degrees):
        r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
        return torch.stack([r.cos(), r.sin()], dim=1)
    # nearest neighbour (largest cosine) in a: 0<->1, 2<->3. In b: 0->1, 1->0, 2->1, 3->2.
    # The same neighbour for points 0, 1 and 3: 3 of 4.
    a, b = unit(0, 10, 90, 100), unit(0, 10, 90, 200)
    mutual = lambda x, y, k: (repa.knn_mask(x @ x.T, k) * repa.knn_mask(y @ y.T, k)).sum(1) / k
    assert mutual(a, b, 1).tolist() == [1, 1, 0, 1]
    assert mutual(a, a, 2).tolist() == [1, 1, 1, 1]


def test_linear_probe_learns_separable_features_and_nothing_from_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 64, generator=g) * 0.5
    y = torch.randint(0, 10, (2000,), generator=g)
    x = 5 + 3 * (means[y] + torch.randn(2000, 64, generator=g))  # BN removes shift and scale
    assert repa.linear_probe(x[:1600], y[:1600], x[1600:], y[1600:], 10) > 0.9
    # BatchNorm is evaluated with the exact statistics of training, even after 5 steps: a shift
    # of every feature by 1000 changes nothing (a running average would still be far off)
    short = [repa.linear_probe(f[:1600], y[:1600], f[1600:], y[1600:], 10, epochs=5)
             for f in (x, x + 1000)]
    assert short[0] > 0.5 and short[1] == pytest.approx(short[0], abs=0.01)
    shuffled = y[torch.randperm(2000, generator=g)]
    assert repa.linear_probe(x[:1600], shuffled[:1600], x[1600:], shuffled[1600:], 10) < 0.2
    # the test rows are standardised with the training statistics, not their own: test points of
    # one class only, at +1 where training saw -1 and +1, are all of that class
    sign = torch.arange(400) % 2
    train = (2.0 * sign - 1 + 0.1 * torch.randn(400, generator=g))[:, None]
    test = 1 + 0.1 * torch.randn(100, 1, generator=g)
    assert repa.linear_probe(train, sign, test, torch.ones(100, dtype=torch.long), 2) == 1


def test_linear_probe_takes_every_batch_of_every_epoch(monkeypatch):
    seen, fit = [], repa.fit
    monkeypatch.setattr(repa, "fit", lambda params, loss, steps, *a: (
        seen.append(steps), fit(params, loss, steps, *a)))
    x, y = torch.randn(70, 4), torch.randint(0, 3, (70,))
    repa.linear_probe(x, y, x, y, 3, epochs=3, batch_size=16)
    assert seen == [3 * 4]  # 4 whole batches of 16 in 70 rows, each epoch


def test_hidden_states_are_the_blocks_outputs_and_need_no_label():
    model = fill_(tiny_model()).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    y = torch.full((3,), model.num_classes)
    v, zs, hidden = model(x, t, y, return_hidden=True)
    v0, zs0 = model(x, t, y)
    assert len(hidden) == len(model.blocks) and torch.equal(v, v0)
    # block encoder_depth's output is what the projector reads
    torch.testing.assert_close(model.projectors[0](hidden[model.encoder_depth - 1]), zs0[0])
    # block_features: eq. (1) at t, the null label, the mean over tokens
    eps = torch.randn_like(x)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    pooled = torch.stack([h.mean(1) for h in model(x_t, t, y, return_hidden=True)[-1]], 1)
    torch.testing.assert_close(repa.block_features(model, x, t, eps), pooled)
    no_null = fill_(tiny_model(class_dropout_prob=0.0))
    zero = torch.zeros(3, dtype=torch.long)  # without a null label: label 0 for every image
    pooled = torch.stack([h.mean(1) for h in no_null(x_t, t, zero, return_hidden=True)[-1]], 1)
    torch.testing.assert_close(repa.block_features(no_null, x, t, eps), pooled)


# The official preprocessing and tokens of every --enc-type (sihyun-yu/REPA train.py and
# utils.load_encoders): input pixels, mean/std and whether the final norm is applied.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
OFFICIAL_ENCODERS = {
    "dinov2-vit-b": (224, IMAGENET, True), "dinov2reg-vit-s": (224, IMAGENET, True),
    "clip-vit-L": (224, CLIP, False), "mae-vit-l": (256, IMAGENET, False),
    "dinov1-vit-b": (256, IMAGENET, True), "mocov3-vit-s": (256, IMAGENET, True),
    "mocov3-vit-b": (256, IMAGENET, True), "mocov3-vit-l": (256, IMAGENET, True),
    "jepa-vit-h": (224, IMAGENET, True)}


@pytest.mark.parametrize("name", list(OFFICIAL_ENCODERS))
def test_every_paper_encoder_has_the_official_preprocessing_and_256_tokens(name):
    pixels, (mean, std), final_norm = OFFICIAL_ENCODERS[name]
    (enc,) = repa.load_encoders(name, 256, **TINY_VIT)
    assert (enc.size, enc.tokens, enc.dim, enc.final_norm) == (pixels, 256, 48, final_norm)
    assert enc.mean.flatten().tolist() == pytest.approx(mean)
    assert enc.std.flatten().tolist() == pytest.approx(std)
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    x = torch.nn.functional.interpolate((images / 255 - enc.mean) / enc.std, pixels,
                                        mode="bicubic") if pixels != 256 else (
        images / 255 - enc.mean) / enc.std
    normed = enc.model.forward_features(x)[:, enc.prefix:]  # final norm, prefix dropped
    (feats,) = repa.encode([enc], images)
    assert feats.shape == (1, 256, 48)
    assert torch.allclose(feats, normed) == final_norm
    if not final_norm:  # MAE, CLIP: the last block's raw output; the final norm gives `normed`
        torch.testing.assert_close(enc.model.norm(feats), normed)
    # REG's target leads with the class token (DINOv2's x_norm_clstoken), normed as the patches
    assert enc.cls == ("" if name.startswith("jepa") else "token")
    if enc.cls:
        (with_cls,) = repa.encode([enc], images, cls=True)
        torch.testing.assert_close(with_cls[:, 1:], feats)
        cls = with_cls[:, 0] if final_norm else enc.model.norm(with_cls[:, 0])
        torch.testing.assert_close(cls, enc.model.forward_features(x)[:, 0])


def test_mocov3_vit_s_has_12_heads_and_clip_is_quickgelu():
    (moco,) = repa.load_encoders("mocov3-vit-s", 256, pretrained=False, depth=1)
    assert moco.model.blocks[0].attn.num_heads == 12 and moco.dim == 384
    (clip,) = repa.load_encoders("clip-vit-l", 256, **TINY_VIT)
    assert "QuickGELU" in type(clip.model.blocks[0].mlp.act).__name__


def test_mocov3_official_file_loads_strictly(tmp_path):
    import timm
    from timm.layers import resample_abs_pos_embed
    # the official MoCo v3 layout at 224 px: base and momentum encoders, predictor and head, and
    # the misnamed norms / MLPs of blocks 13 and 14 of the released ViT-L
    tiny = dict(depth=15, embed_dim=48, num_heads=2)
    vit = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, **tiny)
    wrong = {"blocks.13.norm1": "blocks.13.norm13", "blocks.13.mlp.fc1": "blocks.13.mlp.fc13",
             "blocks.14.norm2": "blocks.14.norm14", "blocks.14.mlp.fc2": "blocks.14.mlp.fc14"}
    state = {}
    for k, v in vit.state_dict().items():
        for right, bad in wrong.items():
            k = k.replace(right, bad)
        state[f"module.base_encoder.{k}"] = v
        state[f"module.momentum_encoder.{k}"] = v + 1
    state.update({"module.base_encoder.head.0.weight": torch.zeros(8, 48),
                  "module.predictor.0.weight": torch.zeros(8, 8)})
    torch.save({"state_dict": state, "epoch": 300}, tmp_path / "mocov3_vitl.pth")
    (enc,) = repa.load_encoders(f"mocov3-vit-l={tmp_path}/mocov3_vitl.pth", 256, **tiny)
    got = enc.model.state_dict()  # loaded strictly: every key of the model came from the file
    torch.testing.assert_close(got["blocks.13.norm1.weight"], vit.blocks[13].norm1.weight)
    torch.testing.assert_close(got["blocks.14.mlp.fc2.bias"], vit.blocks[14].mlp.fc2.bias)
    torch.testing.assert_close(got["pos_embed"], resample_abs_pos_embed(vit.pos_embed, [16, 16]))
    with pytest.raises(repa.UserError, match="mocov3-vit-b=PATH"):  # no timm weights: a file
        repa.load_encoders("mocov3-vit-b")


@pytest.mark.parametrize("name,arch,layout", [
    # the official I-JEPA file: the online encoder under `encoder`, DDP's `module.` prefixes
    ("jepa-vit-h", "vit_huge_patch14_gap_224", lambda sd: {
        "encoder": {f"module.{k}": v for k, v in sd.items()}, "target_encoder": {}, "epoch": 1}),
    # MAE's mae_pretrain_vit_large.pth: the encoder under `model`, 224 px positions
    ("mae-vit-l", "vit_large_patch16_224", lambda sd: {"model": sd})])
def test_official_files_of_ijepa_and_mae_load(tmp_path, name, arch, layout):
    import timm
    tiny = dict(depth=1, embed_dim=48, num_heads=2)
    vit = timm.create_model(arch, pretrained=False, num_classes=0, **tiny)
    torch.save(layout(vit.state_dict()), tmp_path / "official.pth")
    (enc,) = repa.load_encoders(f"{name}={tmp_path}/official.pth", 256, **tiny)
    x = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    torch.testing.assert_close(enc.model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert repa.encode([enc], x)[0].shape == (1, 256, 48)


def test_dit_features_are_taken_on_its_ddpm_chain():
    # --analyze noises a DiT on its own chain: t = 0.25 is timestep 250, with abar of DDPM's
    # linear betas (closed form here), and no class label (the null row)
    model = repa.build_model("DiT-T/4", input_size=16, in_channels=3, num_classes=10,
                             z_dims=[]).eval()
    x, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    feats = repa.block_features(model, x, torch.tensor([0.25, 1.0]), noise)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    k = torch.tensor([250, 999])
    x_t = (abar[k].sqrt().float().view(-1, 1, 1, 1) * x +
           (1 - abar[k]).sqrt().float().view(-1, 1, 1, 1) * noise)
    hidden = model(x_t, k, torch.full((2,), 10), return_hidden=True)[-1]
    assert feats.shape == (2, 6, 128)
    torch.testing.assert_close(feats[:, -1], hidden[-1].mean(1), rtol=1e-5, atol=1e-6)


def test_imports_go_one_way():
    # repa.py imports no file of the project (so it reads, runs and pastes alone); sample.py
    # imports repa, and tools/evaluate.py (which imports nothing of the project) for FID; no
    # tool is imported but by a tool or a test. Read from the source, so a lazy import counts.
    import ast
    tools = {f[:-3] for f in os.listdir(os.path.join(HERE, "tools")) if f.endswith(".py")}
    ours = {"repa", "sample"} | tools

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        return names & ours
    assert imported(os.path.join(HERE, "repa.py")) == set()
    assert imported(os.path.join(HERE, "sample.py")) == {"repa", "evaluate"}
    assert imported(os.path.join(HERE, "tools", "evaluate.py")) == set()
    for tool in tools - {"evaluate"}:
        assert "repa" in imported(os.path.join(HERE, "tools", f"{tool}.py")) or \
            tool.startswith("test_"), tool
    # and at run time: importing repa loads no other file of the project
    code = "import sys, repa; print(sorted(m for m in sys.modules if m in %r))" % sorted(ours)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert out.stdout.strip() == "['repa']", out.stderr[-2000:]

