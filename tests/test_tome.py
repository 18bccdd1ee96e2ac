"""Token merging (mp_plugin.recover.tome) on small real timm ViTs: exactness at r=0, merging, LayerScale, MACs."""

from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from mp_plugin.cli.main import main as cli_main  # noqa: E402
from mp_plugin.evaluation.models import random_timm_model  # noqa: E402
from mp_plugin.recover.tome import (  # noqa: E402
    apply_patch,
    bipartite_soft_matching,
    is_patched,
    merge_weighted,
    remove_patch,
    tokens_per_block,
    tome_mac_table,
)

IMG = 64
SMALL = dict(img_size=IMG, patch_size=8, embed_dim=64, depth=4, num_heads=2)  # 64 patch tokens
VARIANTS = {
    "cls": {},
    "layerscale": {"init_values": 1e-5},
    "avg_no_cls": {"class_token": False, "global_pool": "avg"},
    "reg_tokens": {"reg_tokens": 2},
    "qk_norm": {"qk_norm": True},
}


def small_vit(name: str) -> torch.nn.Module:
    """A 4-block ViT (64 patch tokens) with the features of VARIANTS[name], eval mode."""
    torch.manual_seed(0)
    return VisionTransformer(**SMALL, **VARIANTS[name]).eval()


def smooth_image(batch: int = 2, size: int = IMG) -> torch.Tensor:
    """Low-frequency images: neighbouring patches are nearly alike, so merging loses little."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    chans = [torch.sin(1.5 * xx + c) * torch.cos(1.2 * yy - c) for c in (0.0, 0.7, 1.4)]
    img = torch.stack(chans)
    return torch.stack([img * (1 + 0.1 * b) for b in range(batch)])


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


def tokens_seen(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """Token count entering each block, then leaving the last one (forward hooks)."""
    seen: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in model.blocks]
    handles.append(model.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out.shape[1])))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_r0_is_bit_exact_and_remove_restores(name: str, fused: bool) -> None:
    model = small_vit(name)
    set_fused(model, fused)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        apply_patch(model, r=0)
        assert is_patched(model)
        assert torch.equal(model(x), ref)
        model._tome.r = 4
        merged = model(x)
        assert not torch.equal(merged, ref)
        remove_patch(model)
        assert not is_patched(model)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("timm_name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_r0_bit_exact_on_registry_models(timm_name: str) -> None:
    model = timm.create_model(timm_name, pretrained=False, img_size=IMG).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        apply_patch(model, r=0)
        out = model(x)
    assert torch.equal(out, ref)
    assert model._tome.num_prefix_tokens == model.num_prefix_tokens


@pytest.mark.parametrize("name", ["cls", "avg_no_cls", "reg_tokens"])
def test_tokens_per_block_follow_r_and_clamp(name: str) -> None:
    model = small_vit(name)
    prefix = model.num_prefix_tokens
    x = torch.randn(2, 3, IMG, IMG)
    apply_patch(model, r=8)
    seen = tokens_seen(model, x)
    n0 = 64 + prefix
    assert seen == [n0 - 8 * i for i in range(5)]
    assert seen == tokens_per_block(model, n0)
    # a huge r is clamped as in ToMe's reference: each block removes at most ⌊non-prefix tokens / 2⌋
    model._tome.r = 1000
    seen = tokens_seen(model, x)
    expected = [n0]
    for _ in range(4):
        rest = expected[-1] - prefix
        expected.append(expected[-1] - rest // 2)
    assert expected[1:] == [n0 - 32, n0 - 48, n0 - 56, n0 - 60]
    assert seen == expected
    assert seen[-1] >= prefix + 1
    # per-block r
    model._tome.r = [0, 3, 0, 5]
    assert tokens_seen(model, x) == [n0, n0, n0 - 3, n0 - 3, n0 - 8]


def test_per_block_r_with_wrong_length_is_an_error() -> None:
    model = small_vit("cls")
    with pytest.raises(ValueError, match="entries"):
        apply_patch(model, r=[1, 2])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_small_r_stays_close_on_smooth_input(name: str) -> None:
    model = small_vit(name)
    x = smooth_image()
    with torch.no_grad():
        ref = model.forward_features(x)
        ref_feat = model.forward_head(ref, pre_logits=True)
        apply_patch(model, r=4)
        feat = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feat.shape == ref_feat.shape
    cos = torch.nn.functional.cosine_similarity(feat, ref_feat, dim=-1)
    assert cos.min() > 0.9, cos


@pytest.mark.parametrize("name", ["cls", "avg_no_cls"])
def test_layerscale_is_applied(name: str) -> None:
    """With LayerScale gammas at 0 every residual branch vanishes, patched or not.

    Class-token pooling: the class token is never merged, so the output equals running no
    block at all. Average pooling: the size-weighted pool of merged tokens equals the mean
    over the original tokens, so again the output equals running no block.
    """
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, init_values=1e-5, **VARIANTS[name]).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.zero_()
            blk.ls2.gamma.zero_()
    x = torch.randn(2, 3, IMG, IMG)

    def skip_blocks(inp: torch.Tensor) -> torch.Tensor:
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(inp))))
        return model.forward_head(model.norm(tokens))

    with torch.no_grad():
        skipped = skip_blocks(x)
        assert torch.allclose(model(x), skipped, atol=1e-6)
        apply_patch(model, r=8)
        patched = model(x)
        assert model._tome.size is not None and model._tome.size.shape[1] == 64 + model.num_prefix_tokens - 32
        assert torch.allclose(patched, skipped, atol=1e-5)
        # the gammas really scale the branches: non-zero gammas change the output
        for blk in model.blocks:
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
        assert not torch.allclose(model(x), skipped, atol=1e-3)


def test_merge_preserves_total_size_and_weighted_sum() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 21, 16)
    size = torch.randint(1, 4, (3, 21, 1)).float()
    size[:, 0] = 1  # prefix tokens are never merged, so their size stays 1
    plan = bipartite_soft_matching(torch.randn(3, 21, 8), r=6, num_prefix_tokens=1)
    merged, new_size = merge_weighted(plan, x, size)
    assert merged.shape == (3, 15, 16) and new_size.shape == (3, 15, 1)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(merged[:, 0], x[:, 0])  # the prefix token is untouched


def test_matching_merges_the_most_similar_pairs() -> None:
    """Tokens: prefix, then A0 B0 A1 B1 A2 B2; A1 is almost B2, A0 is far from everything."""
    base = torch.eye(4)
    metric = torch.stack([base[0], base[1], base[2], base[3], base[2] + 0.01 * base[3], base[0], base[3]])[None]
    plan = bipartite_soft_matching(metric, r=1, num_prefix_tokens=1)
    assert plan.src_idx.tolist() == [[1]] and plan.dst_idx.tolist() == [[2]] and plan.keep_idx.tolist() == [[0, 2]]
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.tensor([1.0, 1, 1, 3, 1, 1, 1]).reshape(1, 7, 1)
    merged, new_size = merge_weighted(plan, x, size)
    # order: prefix, kept A (A0, A2), B (B0, B1, B2 + A1)
    assert new_size.flatten().tolist() == [1, 1, 1, 1, 1, 4]
    assert merged.flatten().tolist() == pytest.approx([0, 1, 5, 2, 4, (6 * 1 + 3 * 3) / 4])


def test_trace_source_partitions_the_input_tokens() -> None:
    model = small_vit("cls")
    apply_patch(model, r=6, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, IMG, IMG))
    source, size = model._tome.source, model._tome.size
    assert source.shape == (2, 65 - 24, 65)
    assert torch.equal(source.sum(1), torch.ones(2, 65))  # every input token lands in exactly one output
    assert torch.equal(source.sum(2, keepdim=True), size)
    assert source[:, 0, 0].eq(1).all() and source[:, 0].sum(-1).eq(1).all()  # class token alone


@pytest.mark.parametrize("prop_attn", [True, False])
def test_proportional_attention_flag_and_fused_paths_agree(prop_attn: bool) -> None:
    model = small_vit("cls")
    x = torch.randn(2, 3, IMG, IMG)
    apply_patch(model, r=6, prop_attn=prop_attn)
    with torch.no_grad():
        fused = model.forward_features(x)
        set_fused(model, False)
        explicit = model.forward_features(x)
        model._tome.prop_attn = not prop_attn
        flipped = model.forward_features(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(explicit, flipped, atol=1e-6)  # sizes > 1 from block 2 on: the flag matters


def test_backward_pass_in_train_mode() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, init_values=1e-5, drop_path_rate=0.1, attn_drop_rate=0.1).train()
    apply_patch(model, r=6, prop_attn=False)
    out = model(torch.randn(2, 3, IMG, IMG))
    out.logsumexp(-1).sum().backward()
    for name in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "blocks.2.ls1.gamma", "pos_embed"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_attention_mask_with_merging_is_refused() -> None:
    model = small_vit("cls")
    apply_patch(model, r=2)
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.randn(1, 3, IMG, IMG), attn_mask=torch.zeros(1, 1, 65, 65, dtype=torch.bool))


def test_mac_table_small_vit() -> None:
    table = tome_mac_table(random_timm_model("vit_tiny_patch16_224", IMG), r=2, pattern="2:4", img_size=IMG)
    assert table["tokens_per_block"][0] == 17 and len(table["tokens_per_block"]) == 13
    assert table["tome_macs"] < table["dense_macs"]
    assert table["sparse_macs"] < table["dense_macs"]
    assert table["tome_sparse_macs"] < table["sparse_macs"]
    assert table["tome_sparse_macs"] < table["tome_macs"]
    assert table["sparse_linear_layers"] == 12 * 4
    expected = 100 * (1 - table["tome_macs"] / table["dense_macs"])
    assert math.isclose(table["tome_reduction_pct"], expected)


def test_mac_table_r0_equals_dense_and_does_not_touch_the_model() -> None:
    model = small_vit("cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = tome_mac_table(model, r=0, img_size=IMG)
    assert table["tome_macs"] == table["dense_macs"]
    assert table["tome_sparse_macs"] == table["sparse_macs"]
    assert not is_patched(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    out = tmp_path / "tome.json"
    rc = cli_main(["tome", "vit_tiny_patch16_224", "--img-size", str(IMG), "--r", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ToMe+2:4" in text and "tokens per block: 17 15" in text
    assert out.exists()


@pytest.mark.parametrize("rest,expected", [(5, 2), (6, 3), (1, 0), (0, 0)])
def test_r_is_clamped_to_half_the_tokens_rounded_down_as_in_the_reference(rest: int, expected: int) -> None:
    """ToMe's merge.py clamps r to ⌊(N − protected)/2⌋; an odd count keeps the extra token."""
    plan = bipartite_soft_matching(torch.randn(2, 1 + rest, 8), r=100, num_prefix_tokens=1)
    assert plan.r == expected
