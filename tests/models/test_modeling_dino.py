"""Tests of dino_hf.models.modeling_dino: student/teacher, head, EMA, parameter groups, save/load (the tiny
``model`` fixture is in conftest.py; the backbone's embedding and export are in test_backbones.py)."""

import pytest
import torch
from tiny_models import tiny_dino_config

from dino_hf import DinoForPreTraining, DinoHead, KoLeoLoss
from dino_hf.models.modeling_dino import WeightNormalizedLinear

BATCH = 3


def make_crops(batch: int = BATCH, num_local: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2, batch, 3, 32, 32, generator=generator)
    local_crops = torch.randn(num_local, batch, 3, 16, 16, generator=generator)
    return global_crops, local_crops


def test_teacher_starts_as_a_copy_and_gets_no_gradient(model):
    for (name, student), (_, teacher) in zip(model.student.named_parameters(), model.teacher.named_parameters(), strict=True):
        assert torch.equal(student, teacher), name
        assert not teacher.requires_grad
    global_crops, local_crops = make_crops()
    output = model(global_crops, local_crops, teacher_temperature=0.04)
    output.loss.backward()
    assert all(parameter.grad is None for parameter in model.teacher.parameters())
    assert model.student.backbone.embeddings.cls_token.grad is not None
    assert model.student.head.last_layer.weight_v.grad is not None
    # norm_last_layer: the prototype norm is fixed to 1
    assert model.student.head.last_layer.weight_g.grad is None
    assert torch.equal(model.student.head.last_layer.weight_g, torch.ones_like(model.student.head.last_layer.weight_g))


def test_output_shapes_and_statistics(model):
    global_crops, local_crops = make_crops(num_local=5)
    output = model(global_crops, local_crops, teacher_temperature=0.04)
    assert output.loss.shape == () and output.loss.dtype == torch.float32
    assert output.student_logits.shape == (7, BATCH, 64)
    assert output.teacher_logits.shape == (2, BATCH, 64)
    assert output.teacher_logits_mean.shape == (1, 64)
    assert 0.0 <= output.teacher_entropy.item() <= torch.log(torch.tensor(64.0)).item() + 1e-5
    assert output.teacher_entropy.item() <= output.teacher_mean_entropy.item() + 1e-5
    assert torch.allclose(output.teacher_logits_mean, output.teacher_logits.mean(dim=(0, 1)).unsqueeze(0))


def test_one_backbone_call_per_resolution(model):
    calls = []
    model.student.backbone.embeddings.register_forward_hook(lambda module, args, out: calls.append("student"))
    model.teacher.backbone.embeddings.register_forward_hook(lambda module, args, out: calls.append("teacher"))
    model(*make_crops(num_local=6))
    assert sorted(calls) == ["student", "student", "teacher"]
    calls.clear()
    model(make_crops()[0])  # global crops only
    assert sorted(calls) == ["student", "teacher"]


def test_student_sees_the_same_views_as_the_teacher_first(model):
    model.update_teacher(0.0)
    model.eval()  # no drop path: student == teacher on the same views
    global_crops, local_crops = make_crops()
    output = model(global_crops, local_crops, teacher_temperature=0.04)
    assert torch.allclose(output.student_logits[:2], output.teacher_logits, atol=1e-5)


def test_update_teacher_momentum_endpoints_and_value(model):
    with torch.no_grad():
        for parameter in model.student.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {name: tensor.clone() for name, tensor in model.teacher.named_parameters()}
    model.update_teacher(1.0)
    for name, tensor in model.teacher.named_parameters():
        assert torch.equal(tensor, before[name]), name
    model.update_teacher(0.9)
    students = dict(model.student.named_parameters())
    for name, tensor in model.teacher.named_parameters():
        assert torch.allclose(tensor, 0.9 * before[name] + 0.1 * students[name], atol=1e-6), name
    model.update_teacher(0.0)
    for name, tensor in model.teacher.named_parameters():
        assert torch.equal(tensor, students[name]), name
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


def test_update_teacher_after_moving_the_model(model):
    model.update_teacher(0.5)  # caches the parameter lists
    model.to(torch.float64)
    model.update_teacher(0.0)
    for student, teacher in zip(model.student.parameters(), model.teacher.parameters(), strict=True):
        assert teacher.dtype == torch.float64
        assert torch.equal(student, teacher)


def test_parameter_groups_follow_the_official_rule(model):
    groups = model.get_parameter_groups(weight_decay=0.04)
    decayed, not_decayed = groups
    assert decayed["apply_weight_decay"] and decayed["weight_decay"] == 0.04
    assert not not_decayed["apply_weight_decay"] and not_decayed["weight_decay"] == 0.0
    decayed_ids = {id(parameter) for parameter in decayed["params"]}
    not_decayed_ids = {id(parameter) for parameter in not_decayed["params"]}
    for name, parameter in model.student.named_parameters():
        if not parameter.requires_grad:
            assert id(parameter) not in decayed_ids | not_decayed_ids
        elif name.endswith(".bias") or parameter.ndim == 1:
            assert id(parameter) in not_decayed_ids, name
        else:
            assert id(parameter) in decayed_ids, name
    teacher_ids = {id(parameter) for parameter in model.teacher.parameters()}
    assert not teacher_ids & (decayed_ids | not_decayed_ids)


def test_cancel_last_layer_gradients(model):
    model(*make_crops()).loss.backward()
    model.cancel_last_layer_gradients()
    assert model.student.head.last_layer.weight_v.grad is None
    assert model.student.head.mlp[0].weight.grad is not None


def test_bf16_autocast_keeps_the_loss_in_float32(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(*make_crops(), teacher_temperature=0.04)
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)


def test_center_updates_only_in_training_mode(model):
    model.eval()
    model(*make_crops())
    assert torch.count_nonzero(model.loss_fn.center) == 0
    model.train()
    model(*make_crops(), update_center=False)
    assert torch.count_nonzero(model.loss_fn.center) == 0
    model(*make_crops())
    assert torch.count_nonzero(model.loss_fn.center) > 0


def test_save_and_load_round_trip_everything(model, tmp_path):
    model.train()
    optimizer = torch.optim.AdamW(model.get_parameter_groups(0.04), lr=1e-3)
    for step in range(2):
        model(*make_crops(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.9)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = DinoForPreTraining.from_pretrained(tmp_path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert "loss_fn.center" in restored
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert not any(parameter.requires_grad for parameter in loaded.teacher.parameters())


def test_head_matches_the_official_layout():
    head = DinoHead(in_features=8, num_prototypes=10, hidden_size=6, bottleneck_size=4, num_layers=3, use_batch_norm=True)
    assert [type(module).__name__ for module in head.mlp] == [
        "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"
    ]
    assert isinstance(head.last_layer, WeightNormalizedLinear)
    assert isinstance(DinoHead(8, 10, num_layers=1, bottleneck_size=4).mlp, torch.nn.Linear)
    features = torch.randn(5, 8)
    logits = head(features)
    # weight-normalised rows and L2-normalised bottleneck: |logit| <= 1 when the norm is fixed to 1
    assert logits.shape == (5, 10) and logits.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize(
    ("global_shape", "local_shape", "message"),
    [
        ((2, 3, 32, 32), None, "global_crops"),
        ((2, 3, 1, 32, 32), None, "global_crops"),
        ((1, 3, 3, 32, 32), None, "at least 2 crops"),
        ((2, 3, 3, 32, 32), (4, 2, 3, 16, 16), "local_crops"),
    ],
)
def test_wrong_crop_shapes_raise_one_sentence(model, global_shape, local_shape, message):
    local_crops = None if local_shape is None else torch.zeros(local_shape)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(global_shape), local_crops)


def test_from_backbone_starts_student_and_teacher_from_the_given_weights(tmp_path):
    torch.manual_seed(1)
    source = DinoForPreTraining(tiny_dino_config())
    source.save_backbone(tmp_path / "backbone", which="student")
    model = DinoForPreTraining.from_backbone(tmp_path / "backbone", num_prototypes=32, head_hidden_size=16)
    assert model.config.num_prototypes == 32
    expected = source.student.backbone.state_dict()
    for network in (model.student, model.teacher):
        for key, value in network.backbone.state_dict().items():
            assert torch.equal(value, expected[key]), key


def test_sinkhorn_knopp_centering_option():
    model = DinoForPreTraining(tiny_dino_config(teacher_centering="sinkhorn_knopp"))
    output = model(*make_crops())
    assert torch.isfinite(output.loss)
    assert torch.count_nonzero(model.loss_fn.center) == 0  # the center is not used


@pytest.mark.parametrize("num_rows", [3, 40])  # fewer rows than inputs (output scaling) and more (weight)
def test_weight_normalized_linear_matches_the_definition(num_rows):
    torch.manual_seed(0)
    layer = WeightNormalizedLinear(16, 50, fix_norm=False)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    inputs = torch.randn(num_rows, 16)

    def reference(values):
        weight = layer.weight_v * (layer.weight_g / layer.weight_v.norm(dim=1, keepdim=True))
        return torch.nn.functional.linear(values, weight)

    assert torch.allclose(layer(inputs), reference(inputs), atol=1e-6)
    ours = torch.autograd.grad(layer(inputs).square().sum(), [layer.weight_v, layer.weight_g])
    expected = torch.autograd.grad(reference(inputs).square().sum(), [layer.weight_v, layer.weight_g])
    for gradient, expected_gradient in zip(ours, expected, strict=True):
        assert torch.allclose(gradient, expected_gradient, atol=1e-5)


@pytest.mark.parametrize("fix_norm", [True, False])
def test_weight_normalized_linear_closed_form_gradient_passes_gradcheck(fix_norm):
    """The few-rows path computes its gradient in closed form: checked against finite differences."""
    torch.manual_seed(1)
    layer = WeightNormalizedLinear(6, 9, fix_norm=fix_norm).double()
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.0)
    inputs = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)  # 4 rows < 6 inputs: the closed form
    parameters = [layer.weight_v, *([layer.weight_g] if not fix_norm else [])]

    def function(values, *weights):
        state = dict(zip(("weight_v", "weight_g"), weights, strict=False))
        return torch.func.functional_call(layer, state, (values,))

    assert torch.autograd.gradcheck(function, (inputs, *parameters))


def test_weight_normalized_linear_under_bf16_autocast_matches_the_float32_definition():
    torch.manual_seed(2)
    layer = WeightNormalizedLinear(32, 64)
    inputs = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(inputs)
    output.float().square().sum().backward()
    reference_layer = WeightNormalizedLinear(32, 64)
    reference_layer.load_state_dict(layer.state_dict())
    reference_inputs = inputs.detach().clone().requires_grad_(True)
    weight = reference_layer.weight_v * (reference_layer.weight_g / reference_layer.weight_v.norm(dim=1, keepdim=True))
    torch.nn.functional.linear(reference_inputs, weight).square().sum().backward()
    assert output.dtype == torch.bfloat16
    for ours, expected in ((inputs.grad, reference_inputs.grad), (layer.weight_v.grad, reference_layer.weight_v.grad)):
        assert ours.dtype == torch.float32
        assert (ours - expected).norm() / expected.norm() < 0.02  # bf16 rounding, nothing more


def test_update_teacher_accepts_a_tensor_momentum(model):
    with torch.no_grad():
        for parameter in model.student.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {name: tensor.clone() for name, tensor in model.teacher.named_parameters()}
    model.update_teacher(torch.tensor(1.0))
    for name, tensor in model.teacher.named_parameters():
        assert torch.equal(tensor, before[name]), name
    model.update_teacher(torch.tensor(0.75))
    students = dict(model.student.named_parameters())
    for name, tensor in model.teacher.named_parameters():
        assert torch.allclose(tensor, 0.75 * before[name] + 0.25 * students[name], atol=1e-6), name


# ------------------------------------------------------------------------------ DINOv2's objective
def _dinov2_model(separate_head: bool, centering: str = "centering") -> DinoForPreTraining:
    torch.manual_seed(0)
    config = tiny_dino_config(drop_path_rate=0.0, ibot_loss_weight=0.7, koleo_loss_weight=0.3,
                              ibot_separate_head=separate_head, teacher_centering=centering,
                              ibot_num_prototypes=40 if separate_head else None)
    return DinoForPreTraining(config).eval()


def _masks(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(2, batch, 4, 4, generator=generator) < 0.4  # the 4x4 patch grid of 32 px crops
    masks[0, 0, 0, 0] = True
    return masks


@pytest.mark.parametrize("separate_head", [False, True], ids=["shared_head", "separate_head"])
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_dinov2_objective_matches_its_terms_recomputed_from_the_parts(separate_head, centering):
    """loss = dino + w_ibot * ibot + w_koleo * sum over global crops of KoLeo; the iBOT term pairs the
    student's masked view with the teacher's unmasked one on the masked patches only."""
    model = _dinov2_model(separate_head, centering)
    with torch.no_grad():
        for parameter in model.teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # teacher != student
    global_crops, local_crops = make_crops()
    masks = _masks()
    output = model(global_crops, local_crops, teacher_temperature=0.04, masks=masks, update_center=False)
    flat_masks = masks.reshape(2 * BATCH, 16)
    global_flat = global_crops.flatten(0, 1)
    with torch.no_grad():
        student_class, student_patches = model.student.embed_tokens(global_flat, flat_masks)
        _, teacher_patches = model.teacher.embed_tokens(global_flat)
        patch_head = (model.student.ibot_head, model.teacher.ibot_head) if separate_head else \
            (model.student.head, model.teacher.head)
        student_patch_logits = patch_head[0](student_patches[flat_masks])
        teacher_patch_logits = patch_head[1](teacher_patches[flat_masks])
        expected_ibot = model.ibot_loss_fn(student_patch_logits, teacher_patch_logits, flat_masks, 0.04,
                                           update_center=False)
        expected_koleo = torch.stack([KoLeoLoss()(crop) for crop in student_class.view(2, BATCH, -1)])
    assert output.ibot_loss.shape == () and output.koleo_loss.shape == ()
    torch.testing.assert_close(output.ibot_loss, expected_ibot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.koleo_loss, expected_koleo.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, output.dino_loss + 0.7 * output.ibot_loss + 0.3 * expected_koleo.sum(),
                               rtol=1e-6, atol=1e-6)
    assert output.ibot_num_masked_patches.item() == int(masks.sum())
    assert output.ibot_teacher_logits_sum.shape == (1, 40 if separate_head else 64)
    assert 0.0 <= output.ibot_teacher_entropy.item() <= output.ibot_teacher_mean_entropy.item() + 1e-5


def test_dinov2_heads_centers_and_gradients(tmp_path):
    model = _dinov2_model(separate_head=True).train()
    assert model.student.ibot_head.last_layer.weight_v.shape == (40, 16)
    assert model.ibot_loss_fn.center.shape == (1, 40)
    output = model(*make_crops(), teacher_temperature=0.04, masks=_masks())
    output.loss.backward()
    assert model.student.ibot_head.mlp[0].weight.grad is not None
    assert model.student.backbone.embeddings.mask_token.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.teacher.parameters())
    assert torch.count_nonzero(model.ibot_loss_fn.center) > 0  # training mode: both centers updated
    model.cancel_last_layer_gradients()
    assert model.student.ibot_head.last_layer.weight_v.grad is None
    model.save_pretrained(tmp_path / "model")
    loaded = DinoForPreTraining.from_pretrained(tmp_path / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert "ibot_loss_fn.center" in model.state_dict() and "student.ibot_head.last_layer.weight_v" in model.state_dict()
    shared = _dinov2_model(separate_head=False)
    assert shared.student.ibot_head is None and not any("ibot_head" in key for key in shared.state_dict())


def test_dinov2_model_without_masks_has_no_patch_term():
    model = _dinov2_model(separate_head=False)
    output = model(*make_crops(), teacher_temperature=0.04)
    assert output.ibot_loss.item() == 0.0 and output.ibot_teacher_entropy is None
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        model(*make_crops(), masks=_masks().float())
